"""A small federation through a real mosquitto: aggregator and nodes as separate processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.schemas import Topics, decode_metrics, decode_status

from ..conftest import ends_in, through, wait_until

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monitor_metrics.py"


def test_three_nodes_three_rounds(mosquitto, federation, spawn, node_data, collect, tmp_path):
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.all_status])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report = tmp_path / "aggregator-report.json"
    monitor = spawn("monitor", "monitor", *common, "--json", "--until-done", "--timeout", "120")
    example_log = tmp_path / "example.log"
    with example_log.open("wb") as out:
        example = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "127.0.0.1", str(mosquitto.port), federation],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    aggregator = spawn(
        "aggregator",
        "aggregator",
        *common,
        "--nodes",
        "3",
        "--rounds",
        "3",
        "--report",
        str(report),
    )
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(tmp_path / f"state-{i}"), "--exit-when-done")
        for i, path in enumerate(node_data(3))
    ]  # fmt: skip

    assert aggregator.wait(120) == 0, aggregator.log()
    for node in nodes:
        assert node.wait(60) == 0, node.log()
    assert monitor.wait(60) == 0, monitor.log()
    # Those exits say the broker had every message; each other subscriber's copy (the
    # example's, the watcher's) may still be on its way: mosquitto delivers to each on its own.
    text = example_log.read_text
    wait_until(lambda: "round 3 " in text() and "node pi-2  done" in text(), 10, "the example")
    example.terminate()
    example.wait(10)

    metrics = [decode_metrics(p) for p in watcher.wait_on(topics.metrics, through(3), "metrics")]
    assert [m.round for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m.participants == ["pi-0", "pi-1", "pi-2"]
        assert m.num_examples == 1500
        assert m.rejected == {}
        assert m.closed_by == "all_reported"
        assert m.uplink_bytes > 3 * 4 * 2410  # three dense float32 updates of digits-mlp
        assert m.downlink_bytes == 3 * (m.global_delta_bytes or m.global_bytes)
        assert (m.global_delta_bytes is None) == (m.round == 1)  # compact from round 2 on
    assert metrics[-1].accuracy > metrics[0].accuracy > 0.1

    # Every node ended "done", published retained on its own status topic.
    final_states = {}
    for payload in watcher.wait_on(topics.status("pi-0"), ends_in("done"), "pi-0's done"):
        final_states["pi-0"] = decode_status(payload).state
    assert final_states == {"pi-0": "done"}
    # The aggregator's own report agrees with what was on the wire.
    written = json.loads(report.read_text())
    assert [r["accuracy"] for r in written["rounds"]] == [m.accuracy for m in metrics]
    # fedmq monitor --json saw every round's metrics.
    lines = [json.loads(line) for line in monitor.log().splitlines() if line.startswith("{")]
    seen = [row["round"] for row in lines if row.get("type") == "metrics"]
    assert seen == [1, 2, 3]
    # So did the copy-me example script, with nothing but paho-mqtt and msgpack.
    printed = example_log.read_text().splitlines()
    assert [line.split()[1] for line in printed if line.startswith("round ")] == ["1", "2", "3"]
    assert any(line.startswith("node pi-2  done") for line in printed)


def test_node_refuses_a_model_it_cannot_build(
    mosquitto, federation, spawn, node_data, collect, tmp_path
):
    """A global model whose layout does not match its named architecture is refused with a
    clear status, and the node keeps running (it trains once a good model arrives)."""
    import numpy as np

    from fedmq.models import get_model
    from fedmq.schemas import GlobalModel, TrainingPlan, encode, model_id_of

    topics = Topics(federation)
    watcher = collect([topics.status("pi-x"), topics.all_updates])
    bad_params = {"l0.w": np.zeros((64, 16), np.float32), "l0.b": np.zeros(16, np.float32)}
    plan = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)
    bad = GlobalModel(federation=federation, round=1, model="digits-mlp",
                      model_id=model_id_of(bad_params), params=bad_params, plan=plan)  # fmt: skip
    watcher.client.publish(topics.global_model, encode(bad), qos=1, retain=True).wait_for_publish(5)
    node = spawn("node", "node", "--broker", mosquitto.address, "--federation", federation,
                 "--node-id", "pi-x", "--data", str(node_data(1)[0]), "--state-dir", str(tmp_path / "s"))  # fmt: skip

    def states() -> list[str]:
        return [decode_status(p).state for p in watcher.on(topics.status("pi-x"))]

    wait_until(lambda: "error" in states(), 60, "the node to report an error status")
    error = [decode_status(p) for p in watcher.on(topics.status("pi-x"))][states().index("error")]
    assert "cannot build this model" in (error.detail or "")
    assert "digits-mlp" in (error.detail or "")
    assert watcher.on(topics.update("pi-x")) == []

    good_params = get_model("digits-mlp").init(0)
    good = GlobalModel(federation=federation, round=1, model="digits-mlp",
                       model_id=model_id_of(good_params), params=good_params, plan=plan)  # fmt: skip
    # as an aggregator publishes a run's first model: on global/delta for the nodes that
    # follow compact forms (a node that fetched at connect listens there), then in full
    watcher.client.publish(topics.global_delta, encode(good), qos=1).wait_for_publish(5)
    watcher.client.publish(topics.global_model, encode(good), qos=1, retain=True).wait_for_publish(
        5
    )
    wait_until(lambda: len(watcher.on(topics.update("pi-x"))) == 1, 60, "an update from the node")
    assert node.proc.poll() is None
    watcher.client.publish(topics.global_model, b"", qos=1, retain=True).wait_for_publish(5)


def test_broker_command_starts_and_stops_cleanly(tmp_path):
    from fedmq.broker.process import free_port

    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "fedmq", "broker", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            line = proc.stdout.readline()
            assert f"127.0.0.1:{port}" in line
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            proc.terminate()
            code = proc.wait(timeout=15)
    assert code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


@pytest.mark.parametrize("command", ["broker", "aggregator", "node", "monitor", "demo"])
def test_every_subcommand_has_help(command):
    result = subprocess.run([sys.executable, "-m", "fedmq", command, "--help"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0
    assert "usage: fedmq " + command in result.stdout
    assert len(result.stdout.splitlines()) > 5


def test_bad_arguments_fail_with_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--partition", "dirichlet:-1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "dirichlet:ALPHA" in result.stderr
