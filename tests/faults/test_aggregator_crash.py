"""SIGKILL the aggregator at seeded random moments of a real federation and restart it:
the run must end with bitwise the same global model as an uninterrupted one, and with
every node's update of every round accepted exactly once. In asynchronous mode with a
buffer of every node's update (K = nodes) the versions are as deterministic as rounds, so
the same holds through its own checkpoint and journal (the staleness path is resumed at
seeded moments in tests/unit/test_async.py)."""

import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedmq.schemas import Topics, decode_global, decode_metrics

from ..conftest import ends_final, through, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 10
ROUNDS = 20
KILLS = 10


def start_federation(
    spawn, mosquitto, federation, node_paths, tmp_path, server_optimizer, mode, downlink
):  # type: ignore[no-untyped-def]
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    aggregator_args = [
        "aggregator", *common, "--nodes", str(NODES), "--rounds", str(ROUNDS),
        "--state-dir", str(tmp_path / f"{federation}-aggregator"),
        "--report", str(tmp_path / f"{federation}-report.json"),
        "--server-optimizer", server_optimizer, "--downlink-compression", downlink,
    ]  # fmt: skip
    if mode == "async":
        aggregator_args += ["--mode", "async", "--buffer", str(NODES)]
    aggregator = spawn(f"{federation}-aggregator", *aggregator_args)
    nodes = [
        spawn(f"{federation}-node-{i}", "node", *common, "--node-id", f"pi-{i:02d}",
              "--data", str(path), "--state-dir", str(tmp_path / f"{federation}-state-{i}"),
              "--exit-when-done")
        for i, path in enumerate(node_paths)
    ]  # fmt: skip
    return aggregator, aggregator_args, nodes


def outcome(watcher, topics: Topics):  # type: ignore[no-untyped-def]
    """Per-round metrics (last copy of each round) and the final global's parameters,
    once this watcher has them (the aggregator's exit says only that the broker has)."""
    payloads = watcher.wait_on(topics.metrics, through(ROUNDS), f"metrics of rounds 1-{ROUNDS}")
    metrics = {m.round: m for m in map(decode_metrics, payloads)}
    models = watcher.wait_on(topics.global_model, ends_final, "the final model")
    final = decode_global(models[-1])
    assert final.final
    return [metrics[r] for r in sorted(metrics)], final


# fedadam: its state (moments, step count) must come back from the checkpoint bitwise;
# a compressed downlink: its error-feedback residual too
@pytest.mark.parametrize(
    ("server_optimizer", "mode", "downlink"),
    [
        ("fedavg", "sync", "none"),
        ("fedadam:0.01", "sync", "none"),
        ("fedavg", "async", "none"),
        ("fedavg", "sync", "topk:0.035+sign+ef+flat"),
    ],
)
def test_killed_ten_times_the_run_ends_bitwise_equal(
    mosquitto, spawn, collect, node_data, tmp_path, server_optimizer, mode, downlink
):  # type: ignore[no-untyped-def]
    paths = node_data(NODES)
    # a federation per variant: retained globals stay apart
    tag = f"{server_optimizer.split(':')[0]}-{mode}" + ("-downlink" if downlink != "none" else "")

    reference_topics = Topics(f"crash-reference-{tag}")
    watcher = collect([reference_topics.metrics, reference_topics.global_model])
    aggregator, _, nodes = start_federation(
        spawn,
        mosquitto,
        f"crash-reference-{tag}",
        paths,
        tmp_path,
        server_optimizer,
        mode,
        downlink,
    )
    assert aggregator.wait(300) == 0, aggregator.log()[-3000:]
    for node in nodes:
        assert node.wait(60) == 0, node.log()[-3000:]
    reference_metrics, reference_final = outcome(watcher, reference_topics)

    topics = Topics(f"crash-killed-{tag}")
    watcher = collect([topics.metrics, topics.global_model])
    aggregator, aggregator_args, nodes = start_federation(
        spawn, mosquitto, f"crash-killed-{tag}", paths, tmp_path, server_optimizer, mode, downlink
    )
    rng = random.Random(20261123)
    # a kill after round k's metrics appeared (k = 0: right after round 1 opened), then a
    # random 0-40 ms more, so kills land in every phase of a round
    moments = sorted(rng.sample(range(ROUNDS), KILLS))
    recoveries = []
    for index, closed in enumerate(moments):
        wait_until(
            lambda closed=closed: (
                len(watcher.on(topics.global_model)) > 0
                and {decode_metrics(p).round for p in watcher.on(topics.metrics)}
                >= set(range(1, closed + 1))
            ),
            120,
            f"round {closed} to close",
        )
        time.sleep(rng.uniform(0.0, 0.04))
        aggregator.proc.send_signal(signal.SIGKILL)
        aggregator.proc.wait(10)
        seen = len(watcher.on(topics.metrics))
        restarted_at = time.monotonic()
        aggregator = spawn(f"crash-killed-aggregator-{index + 1}", *aggregator_args)
        wait_until(
            lambda seen=seen: len(watcher.on(topics.metrics)) > seen, 120, "the restart to publish"
        )
        recoveries.append(time.monotonic() - restarted_at)
    assert aggregator.wait(300) == 0, aggregator.log()[-3000:]
    for node in nodes:
        assert node.wait(120) == 0, node.log()[-3000:]
    metrics, final = outcome(watcher, topics)

    print(f"\nrestart to first metrics published, s: {[round(r, 2) for r in recoveries]}")
    assert [m.model_id for m in metrics] == [m.model_id for m in reference_metrics]
    for name, array in reference_final.params.items():
        assert np.asarray(final.params[name]).tobytes() == np.asarray(array).tobytes(), name
    assert [m.accuracy for m in metrics] == [m.accuracy for m in reference_metrics]
    assert sum(len(m.participants) for m in metrics) == NODES * ROUNDS
    for m in metrics:
        assert m.participants == [f"pi-{i:02d}" for i in range(NODES)]
        # the only rejections: copies of accepted updates that the broker redelivered or
        # nodes resent on seeing the restarted aggregator republish (a resend that
        # arrives a round late is a wrong_round)
        assert set(m.rejected) <= {"duplicate", "wrong_round"}, m.rejected
        if mode == "async":
            assert (m.closed_by, m.extra["staleness_max"]) == ("buffer_full", 0)
    resumed = sum(
        Path(tmp_path / f"crash-killed-aggregator-{i}.log").read_text().count("aggregator.resumed")
        for i in range(1, KILLS + 1)
    )
    assert resumed == KILLS
