"""A federation through a real mosquitto with both directions compressed (issue 16): the
nodes' updates and the aggregator's new models, with error feedback on both sides."""

import json

import numpy as np
import pytest

from fedmq.schemas import (
    Topics,
    apply_global_delta,
    decode_global,
    decode_global_delta,
    decode_metrics,
    decode_server_status,
    decode_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = "topk:0.1+sign+ef+flat"
FINAL = "topk:0.3+sign+ef+flat"  # the final model's (--final-downlink-compression)


def test_three_nodes_and_the_aggregator_compress_both_ways(
    mosquitto, federation, spawn, node_data, collect, tmp_path
):
    topics = Topics(federation)
    watcher = collect(
        [topics.metrics, topics.global_model, topics.global_delta, topics.all_status, topics.server]
    )
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report = tmp_path / "report.json"
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--compression", SPEC,
        "--downlink-compression", SPEC, "--final-downlink-compression", FINAL,
        "--nodes", "3", "--rounds", "4",
        "--report", str(report),
    )  # fmt: skip
    # The nodes come once the run's first model is retained: a node that connects before
    # it fetches the full model, and that fetch may race the first model and bring it in
    # full (PROTOCOL section 3), which this test's byte counts below rule out.
    watcher.wait_on(topics.global_model, bool, "the first global model", timeout=90)
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(tmp_path / f"state-{i}"), "--exit-when-done")
        for i, path in enumerate(node_data(3))
    ]  # fmt: skip
    assert aggregator.wait(90) == 0, aggregator.log()
    for node in nodes:
        assert node.wait(60) == 0, node.log()

    metrics = [decode_metrics(p) for p in watcher.on(topics.metrics)]
    assert [m.round for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m.participants == ["pi-0", "pi-1", "pi-2"], m
        assert m.rejected == {}, m
    assert metrics[-1].accuracy > metrics[0].accuracy > 0.1

    # Each compact form rebuilds, from the model before, exactly the retained full one.
    fulls = [decode_global(p) for p in watcher.on(topics.global_model) if p]
    compact = watcher.on(topics.global_delta)
    assert [g.round for g in fulls] == [1, 2, 3, 4, 5]
    first = decode_global_delta(compact[0])  # round 1: the seed, the nodes build it
    assert (first.init_seed, first.model_id) == (0, fulls[0].model_id)
    held = fulls[0].params
    for payload, full in zip(compact[1:], fulls[1:], strict=True):
        message = decode_global_delta(payload)
        assert (message.compression, message.xor) == (FINAL if full.final else SPEC, b"")
        assert len(payload) < len(watcher.on(topics.global_model)[0]) / 10
        rebuilt = apply_global_delta(held, message)
        assert rebuilt.model_id == full.model_id
        for name, array in full.params.items():
            assert np.asarray(rebuilt.params[name]).tobytes() == array.tobytes()
        held = rebuilt.params
    # round r's metrics count the compact form that opened it (compact[r - 1]); the
    # final model's, after the last round, none
    for m, payload in zip(metrics, compact[:-1], strict=True):
        assert m.global_delta_bytes == len(payload)

    # The nodes all ended on the final model: their `done` names it.
    done = [decode_status(p) for i in range(3) for p in watcher.on(topics.status(f"pi-{i}"))]
    finals = {s.node_id: s.model_id for s in done if s.state == "done"}
    assert finals == {f"pi-{i}": fulls[-1].model_id for i in range(3)}
    # They counted what was delivered to them, and the aggregator added it up.
    for i in range(3):
        counts = [s.received_bytes for s in done if s.node_id == f"pi-{i}"]
        assert None not in counts and counts == sorted(counts) and counts[-1] > 0, counts
        # no full model reached them: each compact form once, nothing else
        assert counts[-1] == sum(len(p) for p in compact), (counts, [len(p) for p in compact])
    delivered = [m.downlink_delivered for m in metrics]
    assert all(d is not None and d > 0 for d in delivered[1:]), delivered
    report_ = json.loads(report.read_text())
    assert [r["downlink_delivered"] for r in report_["rounds"]] == delivered

    # The final model's delivery: counted from the nodes' done statuses before the
    # server's done, which carries it, as does the report. It is what the nodes reported
    # receiving for it (their done's count less their previous one), the final compact
    # form once per node.
    for_final = 0
    for i in range(3):
        mine = [s for s in done if s.node_id == f"pi-{i}"]
        last = max(k for k, s in enumerate(mine) if s.state == "done")
        for_final += mine[last].received_bytes - mine[last - 1].received_bytes
    assert for_final == 3 * len(compact[-1])
    servers = [decode_server_status(p) for p in watcher.on(topics.server) if p]
    [finished] = [s for s in servers if s.state == "done"]
    assert (finished.final_downlink_delivered, finished.final_downlink_nodes) == (for_final, 3)
    assert servers[-1] == finished  # done is the last word, after the count
    assert (report_["final_downlink_delivered"], report_["final_downlink_nodes"]) == (for_final, 3)
