"""A broker restart in the middle of a federation: nodes and aggregator reconnect with
back-off, the aggregator republishes the global model the new broker has not seen, nodes
resend their update for the open round, and the federation completes."""

import json

import pytest

from fedmq.broker.process import Mosquitto, free_port
from fedmq.schemas import Topics, decode_metrics

from ..conftest import Collector, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_federation_survives_a_broker_restart(federation, spawn, node_data, tmp_path):
    port = free_port()
    broker = Mosquitto(port=port).start()
    topics = Topics(federation)
    watcher = Collector(("127.0.0.1", port), [topics.metrics])
    try:
        common = ["--broker", broker.address, "--federation", federation, "--log-json"]
        report = tmp_path / "report.json"
        aggregator = spawn("aggregator", "aggregator", *common, "--nodes", "2", "--rounds", "300",
                           "--report", str(report))  # fmt: skip
        nodes = [
            spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
                  "--state-dir", str(tmp_path / f"s{i}"), "--exit-when-done")
            for i, path in enumerate(node_data(2))
        ]  # fmt: skip
        wait_until(
            lambda: len(watcher.on(topics.metrics)) >= 2, 120, "two rounds before the restart"
        )
        broker.stop()
        broker = Mosquitto(port=port).start()

        assert aggregator.wait(180) == 0, aggregator.log()
        for node in nodes:
            assert node.wait(60) == 0, node.log()
        rounds = json.loads(report.read_text())["rounds"]
        assert [r["round"] for r in rounds] == list(range(1, 301))
        assert [r for r in rounds if r["participant_ids"] != ["pi-0", "pi-1"]] == []
        # Nobody was lost; copies sent after the reconnect are counted, not averaged twice.
        assert [
            (r["round"], r["rejected"]) for r in rounds if not set(r["rejected"]) <= {"duplicate"}
        ] == []
        seen = [decode_metrics(p).round for p in watcher.on(topics.metrics)]
        assert seen[:2] == [1, 2]
        assert "mqtt.disconnected" in aggregator.log() or "mqtt.connect_refused" in aggregator.log()
    finally:
        watcher.close()
        broker.stop()
