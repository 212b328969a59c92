"""Built-in example tasks under one in-process federated simulation (no broker).

Each node trains with fedmq.tasks.training.train_local on its shard, the new global model is
the example-weighted mean of the nodes' models (plain FedAvg), and the task's metrics are
taken on the test split after every round. Also reports each task's parameter count and the
milliseconds of one local epoch on one node's shard (after compilation, median of 20).

    python bench/example_tasks.py digits-mlp digits-cnn --rounds 30 --nodes 10 --seed 0
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedmq.schemas.messages import TrainingPlan
from fedmq.tasks.builtin_data import split_builtin
from fedmq.tasks.registry import load_task
from fedmq.tasks.seeds import seed_key
from fedmq.tasks.training import make_epoch, train_local, with_learning_rate


def simulate(
    name: str,
    *,
    nodes: int,
    rounds: int,
    seed: int,
    partition: str,
    learning_rate: float,
    batch_size: int,
    epochs: int,
) -> dict:
    task = load_task(name)
    split = split_builtin(name, nodes, partition, seed)
    assert split is not None, name
    shards, test = split
    plan = TrainingPlan(learning_rate, batch_size, epochs, seed)
    params = task.init(seed_key(seed))
    evaluate = jax.jit(task.metrics)
    history = []
    for number in range(1, rounds + 1):
        trained, weights = [], []
        for index, shard in enumerate(shards):
            p, _ = train_local(
                task,
                params,
                shard.x,
                shard.y,
                plan,
                node_id=f"node-{index + 1}",
                round_number=number,
            )
            trained.append(p)
            weights.append(len(shard))
        params = average(trained, weights)
        history.append(
            {
                k: float(v)
                for k, v in evaluate(params, (jnp.asarray(test.x), jnp.asarray(test.y))).items()
            }
        )
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    return {
        "final": history[-1],
        "history": history,
        "params": count,
        "ms_per_epoch": epoch_ms(task, params, shards[0], plan),
    }


def average(trained: list, weights: list[int]):
    """Plain FedAvg: the example-weighted mean of the nodes' pytrees."""
    total = float(sum(weights))
    return jax.tree.map(
        lambda *leaves: sum(w / total * leaf for w, leaf in zip(weights, leaves, strict=True)),
        *trained,
    )


def epoch_ms(task, params, shard, plan: TrainingPlan) -> float:
    from fedmq.tasks.seeds import epoch_order

    epoch = make_epoch(task, plan.batch_size)
    opt_state = with_learning_rate(task.optimizer.init(params), plan.learning_rate)
    order, mask = epoch_order(
        len(shard), plan.batch_size, seed=0, node_id="n", round_number=1, epoch=0
    )
    x, y = jnp.asarray(shard.x), jnp.asarray(shard.y)
    jax.block_until_ready(epoch(params, opt_state, x, y, order, mask))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(epoch(params, opt_state, x, y, order, mask))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-epochs", type=int, default=1)
    args = parser.parse_args()
    for name in args.tasks:
        result = simulate(
            name,
            nodes=args.nodes,
            rounds=args.rounds,
            seed=args.seed,
            partition=args.partition,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            epochs=args.local_epochs,
        )
        rounds = {
            r: result["history"][r - 1] for r in (1, 5, 10, 20, args.rounds) if r <= args.rounds
        }
        print(f"{name}: params {result['params']}, {result['ms_per_epoch']:.2f} ms per local epoch")
        for r, m in rounds.items():
            print(f"  round {r:3d}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(m.items())))


if __name__ == "__main__":
    main()
