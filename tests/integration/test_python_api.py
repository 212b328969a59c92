"""``fedmq.run`` from Python: an aggregator run in this process, nodes as processes, a
real mosquitto; the same exit status and report as the ``fedmq aggregator`` command."""

import json
import threading

import pytest

import fedmq

pytestmark = pytest.mark.integration


def test_an_aggregator_run_from_python(mosquitto, federation, spawn, node_data, tmp_path):
    report = tmp_path / "report.json"
    settings = fedmq.AggregatorSettings(
        broker=fedmq.BrokerAddress.parse(mosquitto.address),
        federation=federation,
        nodes=2,
        rounds=2,
        report=report,
        state_dir=tmp_path / "aggregator",
    )
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(tmp_path / f"state-{i}"), "--exit-when-done")
        for i, path in enumerate(node_data(2))
    ]  # fmt: skip
    stop = threading.Event()
    timer = threading.Timer(120, stop.set)  # a hung run ends as stopped (130), not never
    timer.start()
    try:
        assert fedmq.run(settings, stop) == 0
    finally:
        timer.cancel()
    for node in nodes:
        assert node.wait(60) == 0, node.log()
    rounds = json.loads(report.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == 2 for r in rounds), rounds
    assert fedmq.read_report(report)["rounds"] == rounds
