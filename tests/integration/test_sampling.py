"""Round sampling through a real mosquitto: only the announced nodes train each round."""

import pytest

from fedmq.schemas import Topics, decode_global, decode_metrics, decode_status

from ..conftest import through

pytestmark = pytest.mark.integration


def test_only_sampled_nodes_train(mosquitto, federation, spawn, collect, node_data, tmp_path):  # type: ignore[no-untyped-def]
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.global_model, topics.all_status])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    fleet = [f"pi-{i}" for i in range(4)]
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--nodes", "4", "--min-nodes", "1",
        "--rounds", "4", "--node-ids", ",".join(fleet), "--sample-fraction", "0.5",
    )  # fmt: skip
    nodes = [
        spawn(node, "node", *common, "--node-id", node, "--data", str(path),
              "--state-dir", str(tmp_path / node), "--exit-when-done")
        for node, path in zip(fleet, node_data(4), strict=True)
    ]  # fmt: skip
    assert aggregator.wait(120) == 0, aggregator.log()
    for node in nodes:
        assert node.wait(60) == 0, node.log()

    # those exits say the broker had every message; the watcher's copies may still be on
    # their way (mosquitto delivers to each subscriber on its own)
    watcher.wait_on(topics.metrics, through(4), "metrics")
    selected = {}
    for payload in watcher.on(topics.global_model):
        model = decode_global(payload)
        selected[model.round] = model.selected
    metrics = [decode_metrics(p) for p in watcher.on(topics.metrics)]
    assert [m.round for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert selected[m.round] is not None and len(selected[m.round]) == 2
        assert m.participants == list(selected[m.round])
        assert m.rejected == {}
    assert len({selected[r] for r in range(1, 5)}) > 1  # the sample changes between rounds
    left_out = [
        decode_status(p)
        for p in watcher.on(
            topics.all_status.replace("+", sorted(set(fleet) - set(selected[1])).pop())
        )
    ]
    assert any(s.state == "idle" and s.round == 1 for s in left_out)
