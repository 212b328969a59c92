"""The aggregator's cost per update in asynchronous mode (``BufferPolicy``, FedBuff)
against synchronous rounds (``RoundPolicy``), measured in the same run on the same
payload sizes: ``Aggregator.handle`` for every update, including the version close that
the K-th update of a version triggers (combine, server update, encoding the new model
and its metrics), divided by the number of updates.

    .venv/bin/python bench/ingest_async.py [--buffer 10] [--repeats 7]

Both policies make a version from K updates (the buffer; the round's expected nodes),
from 2K nodes taking turns, dense deltas. In rounds every update is trained on the open
round's model. In the buffer each node trains on a fixed number of versions back (0, 1
or 2: a third of the updates fresh, the rest stale), as late as the node's previous
update allows, so the staleness check and the scaling of stale deltas
(``(1 + s) ** -0.5``) run as in a real run. The payloads are made once (a first pass
through an aggregator, which gives each version's model id) and replayed into a fresh
aggregator for every repeat, sync and async alternately; the figure is the median over
repeats.
"""

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

from fedmq import logs
from fedmq.aggregator.buffer import BufferPolicy
from fedmq.aggregator.policy import VersionPolicy
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator, RoundSettings
from fedmq.models import MLP
from fedmq.schemas import NodeUpdate, TrainingPlan, encode

Payloads = list[tuple[str, bytes]]


def settings_for(policy: VersionPolicy) -> RoundSettings:
    return RoundSettings(
        federation="bench", model_name="bench", model=MLP((1, 1)), rounds=10**6,
        policy=policy, max_update_bytes=64 * 1024 * 1024,
        plan=TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0),
    )  # fmt: skip


def new_aggregator(policy: VersionPolicy, params: dict[str, np.ndarray]) -> Aggregator:
    aggregator = Aggregator(settings_for(policy), params, publish=lambda *_: None)
    aggregator.start()
    return aggregator


def make_payloads(
    policy: VersionPolicy, params: dict[str, np.ndarray], buffer: int, versions: int, lag: bool
) -> Payloads:
    """``versions`` x ``buffer`` updates from 2 x ``buffer`` nodes taking turns; with
    ``lag`` node i trains on the version ``i % 3`` before the open one (or the oldest its
    previous update allows), else on the open one. Made by feeding them to an aggregator,
    which checks they are all accepted and gives each version's model id."""
    rng = np.random.default_rng(0)
    aggregator = new_aggregator(policy, params)
    model_ids: dict[int, str] = {}
    newest: dict[str, int] = {}  # each node's last trained-on version
    payloads: Payloads = []
    for t in range(1, versions + 1):
        assert aggregator.version == t, f"version {aggregator.version}, expected {t}"
        model_ids[t] = aggregator.model_id
        group = (t % 2) * buffer  # half the nodes train this version, half the next
        for i in range(group, group + buffer):
            node = f"n{i:03d}"
            v = max(t - (i % 3 if lag else 0), newest.get(node, 0) + 1, 1)
            newest[node] = v
            delta = {k: rng.normal(0, 0.01, a.shape).astype(np.float32) for k, a in params.items()}
            update = NodeUpdate(
                federation="bench", node_id=node, round=v, base_model_id=model_ids[v],
                num_examples=150, train_loss=1.0, train_seconds=0.0, delta=delta,
            )  # fmt: skip
            payloads.append((f"fedmq/bench/updates/{node}", encode(update)))
            aggregator.handle(*payloads[-1])
    check(aggregator, versions, buffer, stale=lag)
    return payloads


def check(aggregator: Aggregator, versions: int, buffer: int, *, stale: bool) -> None:
    """Every update accepted, every version made from ``buffer`` of them (stale ones in
    the buffer's case): the measured path is the intended one."""
    made = aggregator.history
    assert len(made) == versions, f"{len(made)} versions made, expected {versions}"
    assert all(not m.rejected for m in made), [m.rejected for m in made]
    assert all(m.num_examples == 150 * buffer for m in made)
    staleness = [m.extra.get("staleness_mean", 0.0) for m in made]
    assert (max(staleness) > 0) == stale, staleness


@dataclass(frozen=True)
class Timing:
    per_update: float  # seconds per update, the version closes included
    intake: float  # mean seconds of a handle that made no version (decode, check, hold)
    close: float  # mean seconds of a handle that made one, less the mean intake


def time_replay(policy: VersionPolicy, params: dict[str, np.ndarray], payloads: Payloads) -> Timing:
    """Every ``handle`` timed (the closing ones make the version) into a fresh aggregator."""
    aggregator = new_aggregator(policy, params)
    intake: list[float] = []
    closing: list[float] = []
    for topic, payload in payloads:
        made = len(aggregator.history)
        started = time.perf_counter()
        aggregator.handle(topic, payload)
        seconds = time.perf_counter() - started
        (closing if len(aggregator.history) > made else intake).append(seconds)
    assert not any(m.rejected for m in aggregator.history)
    mean_intake = statistics.fmean(intake)
    return Timing(
        per_update=(sum(intake) + sum(closing)) / len(payloads),
        intake=mean_intake,
        close=statistics.fmean(closing) - mean_intake,
    )


def median_timing(timings: list[Timing]) -> Timing:
    """Each figure's median over the repeats."""
    return Timing(
        *(statistics.median(getattr(t, name) for t in timings) for name in Timing.__annotations__)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffer", type=int, default=10, help="updates per version (K)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--versions", type=int, default=20, help="digits-mlp versions")
    parser.add_argument("--large-versions", type=int, default=3, help="1M-param versions")
    args = parser.parse_args()
    logs.configure(json=True, level="error")
    from fedmq.models import get_model

    cases = {
        "digits-mlp (2,410 params, 4 tensors)": (get_model("digits-mlp").init(0), args.versions),
        "1,000,000 params (1 tensor)": (
            {"w": np.zeros((1000, 1000), np.float32)},
            args.large_versions,
        ),
    }
    k = args.buffer
    sync = RoundPolicy(expected_nodes=k, min_nodes=k)
    buffered = BufferPolicy(buffer=k)  # poly:0.5, max staleness 20: the defaults
    print(f"K = {k} updates per version (round: expected nodes; async: --buffer), "
          f"{args.repeats} repeats, medians. per update: us per update, version closes "
          "included; intake: us per update that made no version; close: ms to make a version "
          "(the closing update's handle less an intake)")  # fmt: skip
    print(f"{'case':<38} {'bytes':>9} {'vers':>4} {'sync us':>9} {'async us':>9} {'ratio':>6} "
          f"{'intake sync/async us':>21} {'close sync/async ms':>20}")  # fmt: skip
    for name, (params, versions) in cases.items():
        sync_payloads = make_payloads(sync, params, k, versions, lag=False)
        async_payloads = make_payloads(buffered, params, k, versions, lag=True)
        sync_times: list[Timing] = []
        async_times: list[Timing] = []
        for _ in range(args.repeats):  # alternately, so machine noise hits both
            sync_times.append(time_replay(sync, params, sync_payloads))
            async_times.append(time_replay(buffered, params, async_payloads))
        s, a = median_timing(sync_times), median_timing(async_times)
        size = len(sync_payloads[0][1])
        intake = f"{s.intake * 1e6:.1f}/{a.intake * 1e6:.1f}"
        close = f"{s.close * 1e3:.2f}/{a.close * 1e3:.2f}"
        print(f"{name:<38} {size:>9} {versions:>4} {s.per_update * 1e6:>9.1f} "
              f"{a.per_update * 1e6:>9.1f} {a.per_update / s.per_update:>6.2f} "
              f"{intake:>21} {close:>20}")  # fmt: skip


if __name__ == "__main__":
    main()
