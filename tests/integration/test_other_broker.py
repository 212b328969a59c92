"""The federation on a second MQTT broker implementation: amqtt (pure Python, MQTT
3.1.1, from PyPI), so fedmq does not quietly depend on mosquitto's ways. What works and
what does not is written down in docs/scaling.md ("Other brokers")."""

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import wait_until

pytestmark = pytest.mark.integration

CONFIG = """\
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
  amqtt.plugins.sys.broker.BrokerSysPlugin:
    sys_interval: 1
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[str]:
    """amqtt on a free loopback port (the test extra installs it); its address."""
    pytest.importorskip("amqtt", reason="pip install '.[test]' installs amqtt")
    port = free_port()
    config = tmp_path / "amqtt.yaml"
    config.write_text(CONFIG.format(port=port))
    log = (tmp_path / "amqtt.log").open("wb")
    broker = subprocess.Popen(
        [str(Path(sys.executable).parent / "amqtt"), "-c", str(config)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: accepts(port), 30, "amqtt to listen")
        yield f"127.0.0.1:{port}"
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(10)
        log.close()


def test_a_federation_with_an_aggregator_crash_runs_on_amqtt(
    amqtt_broker, federation, spawn, node_data, tmp_path
):
    common = ["--broker", amqtt_broker, "--federation", federation, "--log-json"]
    report = tmp_path / "report.json"
    aggregator_args = [
        "aggregator", *common, "--nodes", "3", "--rounds", "4",
        "--state-dir", str(tmp_path / "aggregator"), "--report", str(report),
    ]  # fmt: skip
    aggregator = spawn("aggregator", *aggregator_args)
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(tmp_path / f"pi-{i}"), "--exit-when-done")
        for i, path in enumerate(node_data(3))
    ]  # fmt: skip
    # SIGKILL the aggregator once round 2 is open; its persistent session keeps the
    # nodes' updates on the broker until the restarted one takes them
    wait_until(lambda: '"round": 2' in aggregator.log(), 180, "round 2 to open")
    time.sleep(0.05)
    aggregator.proc.send_signal(signal.SIGKILL)
    aggregator.proc.wait(10)
    aggregator = spawn("aggregator-restarted", *aggregator_args)
    assert aggregator.wait(180) == 0, aggregator.log()[-3000:]
    for node in nodes:
        assert node.wait(60) == 0, node.log()[-3000:]
    rows = json.loads(report.read_text())["rounds"]
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["participant_ids"] == ["pi-0", "pi-1", "pi-2"]
        assert set(row["rejected"]) <= {"duplicate", "wrong_round"}, row["rejected"]
        # amqtt has no dropped counter: unknown, not 0
        assert row["broker_dropped"] is None
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert "aggregator.resumed" in aggregator.log()
