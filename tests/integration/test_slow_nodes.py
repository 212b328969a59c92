"""The simulation knobs through a real mosquitto: `fedmq demo --slow-nodes` slows the rounds
down as a slow device would, and a node stopped during its `--train-delay` leaves at once."""

import json
import signal
import subprocess
import sys
import time

import pytest

from fedmq.schemas import Topics

from ..conftest import ends_in, wait_until

pytestmark = pytest.mark.integration


def test_slow_nodes_show_in_every_round_and_in_the_report(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "3", "--rounds", "2", "--seed", "0",
         "--slow-nodes", "2:0.5", "--local-epochs", "2", "--report", str(report)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    written = json.loads(report.read_text())
    assert written["slow_nodes"] == {"node_ids": ["node-02", "node-03"], "train_delay": 0.5}
    assert (written["server_optimizer"], written["local_epochs"]) == ("fedavg", 2)
    assert "min_nodes" not in written and "round_timeout" not in written
    for row in written["rounds"]:
        assert row["participants"] == 3
        # two of three nodes are slow: the median update took the delay, and so did the round
        assert row["train_seconds_median"] >= 0.5
        assert row["seconds"] >= 0.5


def test_a_node_stopped_during_its_delay_leaves_at_once_sending_nothing(
    mosquitto, federation, spawn, node_data, collect, tmp_path
):
    topics = Topics(federation)
    watcher = collect([topics.all_updates, topics.status("pi-0")])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    spawn("aggregator", "aggregator", *common, "--nodes", "1", "--rounds", "1",
          "--state-dir", str(tmp_path / "aggregator"))  # fmt: skip
    [data] = node_data(1)
    node = spawn("node", "node", *common, "--node-id", "pi-0", "--data", str(data),
                 "--state-dir", str(tmp_path / "pi-0"), "--train-delay", "120")  # fmt: skip
    wait_until(lambda: "training.delayed" in node.log(), 120, "the node to start its delay")
    stopped_at = time.monotonic()
    node.proc.send_signal(signal.SIGINT)
    assert node.wait(30) == 130, node.log()
    assert time.monotonic() - stopped_at < 10  # not the 120 s of the delay
    assert "training.delay_interrupted" in node.log()
    # its exit says the broker has its offline status, not that the watcher's copy has come
    watcher.wait_on(topics.status("pi-0"), ends_in("offline"), "pi-0's offline status")
    assert watcher.on(topics.all_updates) == []
