"""A node group whose sockets are numbered past 1024 still connects every node.

paho's own loop watches its socket with ``select()``, which cannot take a file descriptor
of 1024 or more: a 300-node group brought 240 nodes online and retried the rest forever,
silently. The group's process here holds 1,030 open files before any node connects, so
every node's socket is numbered past 1024 (``fedmq.netloop`` watches them with epoll)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

HELD = 1030
# Opens HELD files, then runs the CLI as ``python -m fedmq`` does.
_HOLDING = (
    "import os, sys\n"
    f"held = [os.open(os.devnull, os.O_RDONLY) for _ in range({HELD})]\n"
    "assert held[-1] >= 1024, held[-1]\n"
    "from fedmq.cli import entry\n"
    "sys.argv[0] = 'fedmq'\n"
    "entry()\n"
)


def test_nodes_whose_sockets_are_numbered_past_1024_all_come_online(
    mosquitto, federation, collect, node_data, tmp_path
):
    from fedmq.schemas import Topics, decode_status

    topics = Topics(federation)
    count = 4
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(
        "".join(
            f"--node-id s{i} --data {path} --broker {mosquitto.address} --federation {federation}\n"
            for i, path in enumerate(node_data(count))
        )
    )
    watcher = collect([topics.all_status])

    def state(node: str) -> str | None:
        seen = watcher.on(topics.status(node))
        return decode_status(seen[-1]).state if seen else None

    log = tmp_path / "group.log"
    with log.open("wb") as out:
        group = subprocess.Popen(
            [sys.executable, "-c", _HOLDING, "node-group", str(nodes), "--log-json"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_until(
            lambda: all(state(f"s{i}") == "online" for i in range(count)) or group.poll() is not None,
            60, f"{count} nodes online",
        )  # fmt: skip
        assert group.poll() is None, log.read_text()[-3000:]
        sockets = [int(fd.name) for fd in Path(f"/proc/{group.pid}/fd").iterdir() if _is_socket(fd)]
        assert len(sockets) >= count and min(sockets) >= 1024, sockets
        group.terminate()
        assert group.wait(timeout=20) == 130, log.read_text()[-3000:]
    finally:
        if group.poll() is None:
            group.kill()
            group.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(state(f"s{i}") != "offline" for i in range(count)):
        time.sleep(0.05)
    assert [state(f"s{i}") for i in range(count)] == ["offline"] * count
    assert '"mqtt.connect_failed"' not in log.read_text()


def _is_socket(fd: Path) -> bool:
    try:
        return str(fd.readlink()).startswith("socket:")
    except OSError:  # closed meanwhile
        return False
