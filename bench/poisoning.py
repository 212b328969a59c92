"""Poisoned updates against each aggregation rule: final test accuracy on digits-mlp.

    .venv/bin/python bench/poisoning.py [--rounds 30] [--rules fedavg,median,...]

First (issue 11) one hostile node of ten, every round, under plain FedAvg, the default
rule and the robust ones (``HOSTILE``: it claims 2**24 examples and the largest loss and
sends its delta sign-flipped, a sign flip x 1e6, the fleet's last step reversed at the
schema's limit, or every value at the schema's limit), on the reference IID split and on
a Dirichlet(0.5) one.

Then (issue 5) ten nodes, the reference IID split, 30 rounds, 2 of the 10 nodes poisoned: each trains
honestly and then sends either its delta times -10 (``scale``) or Gaussian noise with
sigma 1 per number (``noise``, norm ~49, about 100x an honest update's). Everything is
in-process and real except the network: ``bench.trainer.Trainer`` (the node's ``fedmq.tasks.training``) trains each node's
shard, its delta goes out as an encoded ``NodeUpdate`` and the real ``Aggregator`` (with
the rule under test) validates, aggregates and evaluates it. A node whose training
diverged sends nothing, as ``fedmq node`` does; a round nobody completes ends the run
(``diverged`` in the table) with the model it had.

Then the cost of closing a round under each rule (``aggregator.robust.aggregate`` on
dense updates already decoded): time, and peak memory allocated on top of the updates
(tracemalloc), for digits-mlp and a 1,000,000-parameter tensor.
"""

import argparse
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmq import logs
from fedmq.aggregator.evaluate import evaluate
from fedmq.aggregator.robust import DEFAULT, aggregate, parse_rule
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
from fedmq.datasets import digits, partition
from fedmq.models import get_model
from fedmq.tasks.training import delta

try:
    from bench.trainer import Trainer
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from trainer import Trainer  # type: ignore[no-redef]
from fedmq.schemas import NodeUpdate, Topics, TrainingPlan, encode
from fedmq.schemas.encodings import MAX_ABS
from fedmq.schemas.messages import MAX_EXAMPLES, MAX_LOSS

MODEL_NAME = "digits-mlp"
MODEL = get_model(MODEL_NAME)
NODES = 10
POISONED = 2  # the first POISONED node ids
PLAN = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)
FEDERATION = "poisoning"
RULES = [
    "fedavg", "clip-norm:1", "clip-median:2", str(DEFAULT), "median", "trimmed-mean:0.2",
    "trimmed-mean:0.2+clip-median:2",
]  # fmt: skip
HOSTILE_RULES = ["fedavg", str(DEFAULT), "median", "trimmed-mean:0.2"]

Delta = dict[str, np.ndarray]
# An attack: the poisoned node's honest delta and the global model's last change (zero in
# round 1) in, what it sends out: a delta, or a delta and the num_examples it claims.
Attack = Callable[[Delta, Delta, np.random.Generator], "Delta | tuple[Delta, int]"]


def scale(honest: Delta, trend: Delta, rng: np.random.Generator) -> Delta:
    return {name: (value * np.float32(-10)).astype(np.float32) for name, value in honest.items()}


def noise(honest: Delta, trend: Delta, rng: np.random.Generator) -> Delta:
    return {name: rng.normal(0.0, 1.0, v.shape).astype(np.float32) for name, v in honest.items()}


ATTACKS: dict[str, Attack | None] = {"clean": None, "scale": scale, "noise": noise}

# One hostile node of ten (issue 11), every round, claiming the most examples the schema
# allows (2**24) and the largest training loss, and sending: its own delta sign-flipped
# (``examples``: the claim is the attack), a sign flip scaled by 1e6 (``flip``), the
# global model's last change reversed and scaled to the schema's largest value (``trend``:
# straight against the fleet's direction), or every value at the schema's limit, 1e15,
# with random signs (``huge``).


def _claimed(delta: Delta) -> tuple[Delta, int]:
    return {n: np.clip(v, -MAX_ABS, MAX_ABS).astype(np.float32) for n, v in delta.items()}, (
        MAX_EXAMPLES
    )


def inflated_flip(honest: Delta, trend: Delta, rng: np.random.Generator) -> tuple[Delta, int]:
    return _claimed({name: -value for name, value in honest.items()})


def inflated_scaled_flip(
    honest: Delta, trend: Delta, rng: np.random.Generator
) -> tuple[Delta, int]:
    return _claimed({name: value * np.float32(-1e6) for name, value in honest.items()})


def against_trend(honest: Delta, trend: Delta, rng: np.random.Generator) -> tuple[Delta, int]:
    peak = max(float(np.abs(v).max()) for v in trend.values()) or 1.0
    return _claimed({name: -value * (MAX_ABS / peak) for name, value in trend.items()})


def inflated_huge(honest: Delta, trend: Delta, rng: np.random.Generator) -> tuple[Delta, int]:
    return _claimed({n: rng.choice([-MAX_ABS, MAX_ABS], v.shape) for n, v in honest.items()})


HOSTILE: dict[str, Attack | None] = {
    "clean": None, "examples": inflated_flip, "flip": inflated_scaled_flip,
    "trend": against_trend, "huge": inflated_huge,
}  # fmt: skip


class Fleet:
    """The ten nodes' trainers on the reference split, compiled once for all of them."""

    def __init__(self, split: str = "iid") -> None:
        train, self.test = digits()
        shards = partition(train.y, NODES, split, 0)
        # One task for all: the equal-sized shards share one compiled epoch (the compile
        # dominates a short run on a loaded machine; each node process compiles its own).
        self.trainers = [Trainer(MODEL_NAME, train.x[s], train.y[s]) for s in shards]


@dataclass(frozen=True)
class Run:
    accuracies: list[float]  # per closed round
    final: float  # test accuracy of the last model
    diverged_at: int | None  # the round nobody could complete, if any
    model_id: str  # of the last model: equal ids, bitwise equal models


def simulate(
    fleet: Fleet, rule: str, attack: Attack | None, *, rounds: int = 30, poisoned: int = POISONED
) -> Run:
    """A whole federation in-process under ``rule``, the first ``poisoned`` nodes running
    ``attack`` (None: all honest)."""
    settings = RoundSettings(
        federation=FEDERATION,
        model_name=MODEL_NAME,
        model=MODEL,
        rounds=rounds,
        policy=RoundPolicy(expected_nodes=NODES, min_nodes=NODES),
        plan=PLAN,
        max_update_bytes=dense_update_bound(MODEL),
        aggregation=parse_rule(rule),
    )
    aggregator = Aggregator(
        settings,
        MODEL.init(PLAN.seed),
        publish=lambda topic, payload, retain: None,
        test=fleet.test,
        clock=lambda: 0.0,
        wall_clock=lambda: 0.0,
    )
    topics = Topics(FEDERATION)
    aggregator.start()
    diverged_at = None
    previous = aggregator.params
    while not aggregator.done:
        opened, base = aggregator.round, aggregator.params
        trend = {name: (base[name] - previous[name]).astype(np.float32) for name in base}
        previous = base
        for i, trainer in enumerate(fleet.trainers):
            node = f"n{i:02d}"
            trained, loss = trainer.train(
                base, learning_rate=PLAN.learning_rate, batch_size=PLAN.batch_size,
                local_epochs=PLAN.local_epochs, seed=PLAN.seed, node_id=node, round=opened,
            )  # fmt: skip
            change = delta(trained, base)
            if not np.isfinite(loss) or not all(np.isfinite(v).all() for v in change.values()):
                continue  # fedmq node sends nothing when its training diverged
            examples = trainer.num_examples
            if attack is not None and i < poisoned:
                sent = attack(change, trend, np.random.default_rng([i, opened]))
                change, examples = sent if isinstance(sent, tuple) else (sent, examples)
                loss = MAX_LOSS if isinstance(sent, tuple) else loss
            update = NodeUpdate(
                federation=FEDERATION, node_id=node, round=opened,
                base_model_id=aggregator.model_id, num_examples=examples,
                train_loss=loss, train_seconds=0.0, delta=change,
            )  # fmt: skip
            aggregator.handle(topics.update(node), encode(update))
        if aggregator.round == opened:  # updates missing or rejected: the run is stuck
            diverged_at = opened
            break
    _, final = evaluate(MODEL, aggregator.params, fleet.test)
    accuracies = [m.accuracy for m in aggregator.history if m.accuracy is not None]
    return Run(accuracies, final, diverged_at, aggregator.model_id)


def close_cost(params: int, nodes: int, rule: str, repeats: int = 3) -> tuple[float, float]:
    """(seconds, peak MiB allocated) of ``aggregate`` over ``nodes`` dense updates of one
    ``params``-element tensor; the updates themselves are not counted (already held)."""
    rng = np.random.default_rng(0)
    layout = {"w": (params,)}
    updates = [({"w": rng.normal(0, 1, params).astype(np.float32)}, 100) for _ in range(nodes)]
    parsed = parse_rule(rule)
    seconds = []
    for _ in range(repeats):
        tracemalloc.start()
        started = time.perf_counter()
        aggregate(parsed, updates, layout)
        seconds.append(time.perf_counter() - started)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return min(seconds), peak / 2**20


def hostile_table(rounds: int, split: str) -> None:
    fleet = Fleet(split)
    print(
        f"{MODEL_NAME}, {NODES} nodes {split}, 1 hostile every round, {rounds} rounds: final "
        "test accuracy (change vs the same rule's clean run, points)"
    )
    print(f"{'rule':38s} " + "".join(f"{name:>14s}" for name in HOSTILE))
    for rule in HOSTILE_RULES:
        cells, clean = [], None
        for attack in HOSTILE.values():
            run = simulate(fleet, rule, attack, rounds=rounds, poisoned=1)
            clean = run.final if clean is None else clean
            cell = f"{100 * run.final:5.1f} ({100 * (run.final - clean):+5.1f})"
            cells.append(cell + ("*" if run.diverged_at else " "))
        print(f"{rule:38s} " + "".join(f"{cell:>14s}" for cell in cells))
    print("* stalled: a round no honest update reached (the poisoned model's training blew up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args()
    logs.configure(level="error")  # a poisoned run rejects many updates, by design
    for split in ("iid", "dirichlet:0.5"):
        hostile_table(args.rounds, split)
        print()
    fleet = Fleet()
    print(
        f"{MODEL_NAME}, {NODES} nodes IID, {POISONED} poisoned, {args.rounds} rounds: "
        "final test accuracy (change vs clean fedavg, points)"
    )
    print(f"{'rule':38s} {'clean':>14s} {'scale -10':>14s} {'noise':>14s} {'s/run':>6s}")
    baseline = None
    for rule in args.rules.split(","):
        cells, seconds = [], []
        for attack in ATTACKS.values():
            started = time.perf_counter()
            run = simulate(fleet, rule, attack, rounds=args.rounds)
            seconds.append(time.perf_counter() - started)
            if baseline is None:
                baseline = run.final
            cell = f"{100 * run.final:5.1f} ({100 * (run.final - baseline):+5.1f})"
            cells.append(cell + ("*" if run.diverged_at else " "))
        print(f"{rule:38s} {cells[0]:>14s} {cells[1]:>14s} {cells[2]:>14s} {min(seconds):6.1f}")
    print("* diverged: a round no node could complete (training blew up), model of that round")
    print("\nround close: aggregate() alone, dense float32 updates already held")
    print(f"{'rule':38s} {'params':>9s} {'nodes':>5s} {'ms':>8s} {'peak MiB':>9s}")
    for params, nodes in ((MODEL.num_params, NODES), (1_000_000, 10), (1_000_000, 100)):
        for rule in ("fedavg", "fedavg+clip-median:2", str(DEFAULT), "median", "trimmed-mean:0.2"):
            seconds, peak = close_cost(params, nodes, rule)
            print(f"{rule:38s} {params:9d} {nodes:5d} {1e3 * seconds:8.2f} {peak:9.1f}")


if __name__ == "__main__":
    main()
