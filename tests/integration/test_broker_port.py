"""A port that is already taken: `fedmq broker` and the Mosquitto class say so in one line,
instead of "listening on ..." (they saw the other program accept) then "mosquitto exited"."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedmq.broker.process import Mosquitto, port_in_use

from ..conftest import alive, mosquitto_workdir

pytestmark = pytest.mark.integration


@pytest.fixture(params=["listening", "bound"])
def taken_port(request):  # type: ignore[no-untyped-def]
    """A loopback port held by another socket: listening (another server), or only bound."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        if request.param == "listening":
            holder.listen()
        yield holder.getsockname()[1]


def test_the_broker_command_says_the_address_is_in_use(taken_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedmq", "broker", "--port", str(taken_port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "listening on" not in done.stdout
    assert done.stderr == (
        f"fedmq broker: error: 127.0.0.1:{taken_port} is already in use (another broker "
        "running?): stop it, or choose another --port\n"
    )


def test_start_refuses_a_taken_port(taken_port: int) -> None:
    broker = Mosquitto(port=taken_port)
    try:
        with pytest.raises(RuntimeError, match=rf"^127\.0\.0\.1:{taken_port} is already in use"):
            broker.start()
        assert broker.process is None
    finally:
        broker.stop()  # by PID, if it did start


def test_a_config_mosquitto_refuses_is_one_line_with_its_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole log came back, several lines (with root's warning first)."""
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nbogus_option 1\n")
    broker = Mosquitto(config=conf)
    try:
        with pytest.raises(RuntimeError) as raised:
            broker.start()
    finally:
        broker.stop()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"mosquitto did not start on port {broker.port}: ")
    assert "bogus_option" in message and message.endswith(f"(config {conf})")


def test_mosquitto_ends_with_a_sigkilled_fedmq_broker() -> None:
    """Like the demo's: no orphan broker holding the port after `kill -9` of its parent."""
    with subprocess.Popen(
        [sys.executable, "-m", "fedmq", "broker", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    ) as command:  # fmt: skip
        try:
            assert command.stdout is not None
            line = command.stdout.readline()
            match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(pid (\d+)\)", line)
            assert match, line
            port, pid = int(match.group(1)), int(match.group(2))
            leftover = mosquitto_workdir(pid)  # the killed command cannot remove it
            os.kill(command.pid, signal.SIGKILL)
            command.wait(timeout=10)
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            shutil.rmtree(leftover, ignore_errors=True)
            assert not alive(pid)
            assert not port_in_use("127.0.0.1", port)
        finally:
            if command.poll() is None:
                command.kill()
