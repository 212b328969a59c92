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


def time_replay(policy: VersionPolicy, params: dict[str, np.ndarray], payloads: Payloads) -> float:
    """Seconds per update: every ``handle`` (the closing ones make the version)."""
    aggregator = new_aggregator(policy, params)
    started = time.perf_counter()
    for topic, payload in payloads:
        aggregator.handle(topic, payload)
    seconds = time.perf_counter() - started
    assert not any(m.rejected for m in aggregator.history)
    return seconds / len(payloads)


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
          f"{args.repeats} repeats, median; us per update, version close included")  # fmt: skip
    print(f"{'case':<38} {'bytes':>9} {'versions':>8} {'sync us':>9} {'async us':>9} {'ratio':>6}")
    for name, (params, versions) in cases.items():
        sync_payloads = make_payloads(sync, params, k, versions, lag=False)
        async_payloads = make_payloads(buffered, params, k, versions, lag=True)
        sync_times, async_times = [], []
        for _ in range(args.repeats):  # alternately, so machine noise hits both
            sync_times.append(time_replay(sync, params, sync_payloads))
            async_times.append(time_replay(buffered, params, async_payloads))
        s, a = statistics.median(sync_times), statistics.median(async_times)
        size = len(sync_payloads[0][1])
        print(f"{name:<38} {size:>9} {versions:>8} {s * 1e6:>9.1f} {a * 1e6:>9.1f} {a / s:>6.2f}")


if __name__ == "__main__":
    main()
