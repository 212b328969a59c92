"""Restarting the aggregator with other run settings against a real federation: a larger
--rounds continues a finished run, --rollback-to goes back to an earlier round's model
with another aggregation rule, and the nodes follow without being restarted."""

import json

import pytest

from fedmq.schemas import Topics, decode_global, decode_metrics

from ..conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 3


def test_a_finished_run_continues_and_rolls_back_with_the_nodes_still_running(
    mosquitto, spawn, collect, node_data, tmp_path, federation
):  # type: ignore[no-untyped-def]
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report = tmp_path / "report.json"
    aggregator_args = [
        "aggregator", *common, "--nodes", str(NODES), "--test-data", "none",
        "--state-dir", str(tmp_path / "aggregator"), "--report", str(report),
    ]  # fmt: skip
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.global_model])
    for i, path in enumerate(node_data(NODES)):
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(tmp_path / f"node-{i}"))  # fmt: skip

    first = spawn("aggregator-1", *aggregator_args, "--rounds", "2")
    assert first.wait(300) == 0, first.log()[-3000:]
    # the broker delivers to each subscriber on its own: the watcher's copy may lag the exit
    models = watcher.wait_on(
        topics.global_model, lambda ps: any(decode_global(p).round == 3 for p in ps), "round 3"
    )
    opened = {decode_global(p).round: decode_global(p) for p in models}
    assert opened[3].final

    # --rounds 4 on the finished 2-round run: it was "exit 0, nothing done"
    second = spawn("aggregator-2", *aggregator_args, "--rounds", "4")
    assert second.wait(300) == 0, second.log()[-3000:]
    assert [r["round"] for r in json.loads(report.read_text())["rounds"]] == [1, 2, 3, 4]
    wait_until(
        lambda: {decode_metrics(p).round for p in watcher.on(topics.metrics)} == {1, 2, 3, 4},
        30,
        "metrics of rounds 3 and 4",
    )
    seen = len(watcher.on(topics.metrics))

    # back to the model that opened round 3, this time aggregated by the median
    third = spawn(
        "aggregator-3", *aggregator_args, "--rounds", "4", "--rollback-to", "3",
        "--aggregation", "median",
    )  # fmt: skip
    assert third.wait(300) == 0, third.log()[-3000:]
    rows = json.loads(report.read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]

    def by_median(payloads: list[bytes]) -> list[int]:
        again = map(decode_metrics, payloads[seen:])
        return [m.round for m in again if m.extra.get("aggregation") == "median"]

    watcher.wait_on(topics.metrics, lambda ps: 4 in by_median(ps), "round 4's median metrics")
    again = [decode_metrics(p) for p in watcher.on(topics.metrics)[seen:]]
    assert [m.round for m in again if m.extra.get("aggregation") == "median"] == [3, 4]
    assert all(len(m.participants) == NODES for m in again if m.round >= 3)
    reopened = [decode_global(p) for p in watcher.on(topics.global_model)]
    assert any(g.round == 3 and g.model_id == opened[3].model_id for g in reopened)
