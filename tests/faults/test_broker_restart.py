"""Restart mosquitto twice in the middle of rounds (once cleanly, once SIGKILL): the
federation completes, every live node's update of every round is in, and the model is
bitwise the one an undisturbed run of the same federation ends with."""

import json

import pytest

from fedmq.broker.process import Mosquitto, free_port
from fedmq.schemas import Topics, decode_global

from ..conftest import Collector, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 4
ROUNDS = 12


def run_federation(spawn, address, name, paths, tmp_path):  # type: ignore[no-untyped-def]
    common = ["--broker", address, "--federation", name, "--log-json"]
    report = tmp_path / f"{name}-report.json"
    aggregator = spawn(
        f"{name}-aggregator", "aggregator", *common, "--nodes", str(NODES),
        "--rounds", str(ROUNDS), "--report", str(report),
        "--state-dir", str(tmp_path / f"{name}-aggregator"),
    )  # fmt: skip
    nodes = [
        spawn(f"{name}-node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(tmp_path / f"{name}-s{i}"), "--exit-when-done")
        for i, path in enumerate(paths)
    ]  # fmt: skip
    return aggregator, nodes, report


def test_two_broker_restarts_mid_round_lose_nothing(mosquitto, spawn, node_data, tmp_path):  # type: ignore[no-untyped-def]
    paths = node_data(NODES)
    aggregator, nodes, report = run_federation(
        spawn, mosquitto.address, "restart-reference", paths, tmp_path
    )
    assert aggregator.wait(180) == 0, aggregator.log()[-3000:]
    reference = json.loads(report.read_text())["rounds"]

    port = free_port()
    broker = Mosquitto(port=port, data_dir=tmp_path / "broker-data").start()
    topics = Topics("restart-disturbed")
    watcher = Collector(("127.0.0.1", port), [topics.global_model])
    try:
        aggregator, nodes, report = run_federation(
            spawn, broker.address, "restart-disturbed", paths, tmp_path
        )
        for opened, how in ((3, "restart"), (7, "kill")):
            wait_until(
                lambda opened=opened, w=watcher: any(
                    decode_global(p).round >= opened for p in w.on(topics.global_model)
                ),
                120,
                f"round {opened} to open",
            )
            watcher.close()
            if how == "restart":
                broker.restart()  # SIGTERM: mosquitto saves its database first
            else:
                broker.kill()  # a crash: only the last autosave survives
                broker.start()
            watcher = Collector(("127.0.0.1", port), [topics.global_model])
        assert aggregator.wait(240) == 0, aggregator.log()[-3000:]
        for node in nodes:
            assert node.wait(120) == 0, node.log()[-3000:]
    finally:
        watcher.close()
        broker.stop()

    rounds = json.loads(report.read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for row in rounds:  # no live node's update lost, none counted twice
        assert row["participant_ids"] == [f"pi-{i}" for i in range(NODES)], row
        assert set(row["rejected"]) <= {"duplicate", "wrong_round"}, row
    assert [r["model_id"] for r in rounds] == [r["model_id"] for r in reference]
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in reference]
    log = aggregator.log()
    assert "mqtt.disconnected" in log or "mqtt.connect_refused" in log
