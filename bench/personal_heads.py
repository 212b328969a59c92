"""Personal heads (Task.personal, FedPer) against plain FedAvg and FedAvg + local fine-tuning.

Digits, 10 nodes, Dirichlet(ALPHA) label skew: each node holds out a fifth of its examples
(fedmq.tasks.holdout, the split a node makes for federated evaluation) and the figure is
the MEAN over nodes of each node's accuracy on its own held-out examples, for:

- fedavg:        the final global model (the whole MLP federated);
- fedavg+ft:     that model after one more local epoch on the node's training examples
                 (the baseline the personalisation literature finds hard to beat);
- personal:      the final shared trunk with the node's own head (the same MLP with
                 ``personal=lambda path: path[0] == "head"``: the head never leaves the node).

The federation is simulated in one process with the node's own code paths: local training
is fedmq.tasks.training.train_local, the split into shared and personal tensors is
fedmq.tasks.personal, the global is the example-weighted mean of the shared tensors
(FedAvg). No broker: the wiring is tested elsewhere (tests/unit/test_node_personal.py,
tests/integration); this measures the method.

    python bench/personal_heads.py --seeds 0 1 2 --rounds 30 --alpha 0.1
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmq import Task
from fedmq.datasets import digits, partition
from fedmq.schemas.messages import TrainingPlan
from fedmq.tasks.holdout import holdout
from fedmq.tasks.naming import flatten_params, named_leaves, unflatten_params
from fedmq.tasks.personal import join, personal_names, split
from fedmq.tasks.seeds import seed_key
from fedmq.tasks.training import train_local

FEATURES, HIDDEN, CLASSES = 64, 32, 10


def init(key):
    trunk, head = jax.random.split(key)
    return {
        "trunk": {
            "w": jax.random.normal(trunk, (FEATURES, HIDDEN)) * jnp.sqrt(2.0 / FEATURES),
            "b": jnp.zeros(HIDDEN),
        },
        "head": {
            "w": jax.random.normal(head, (HIDDEN, CLASSES)) * jnp.sqrt(1.0 / HIDDEN),
            "b": jnp.zeros(CLASSES),
        },
    }


def logits(params, x):
    hidden = jax.nn.relu(x @ params["trunk"]["w"] + params["trunk"]["b"])
    return hidden @ params["head"]["w"] + params["head"]["b"]


def loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y)


def make_task(personal: bool) -> Task:
    return Task(
        name="digits-trunk-head",
        init=init,
        loss=loss,
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
        personal=(lambda path: path[0] == "head") if personal else None,
    )


@jax.jit
def accuracy(params, x, y):
    return (logits(params, x).argmax(-1) == y).mean()


def node_data(seed: int, nodes: int, alpha: float):
    """Per node: (train x, train y, held-out x, held-out y), split as a node splits."""
    train, _ = digits()
    shards = partition(train.y, nodes, f"dirichlet:{alpha}", seed)
    out = []
    for index, shard in enumerate(shards):
        x, y = train.x[shard], train.y[shard]
        keep, held = holdout(len(y), 0.2, seed=seed, node_id=node_id(index))
        out.append((x[keep], y[keep], x[held], y[held]))
    return out


def node_id(index: int) -> str:
    return f"node-{index + 1:02d}"


def federate(task: Task, data, *, seed: int, rounds: int, plan: TrainingPlan):
    """(final shared tensors, each node's personal tensors) after ``rounds`` of FedAvg
    over the shared tensors; personal ones stay with their node."""
    template = jax.eval_shape(task.init, seed_key(0))
    order = [name for name, _, _ in named_leaves(template)]
    own = personal_names(task, template)
    shared, initial_personal = split(flatten_params(task.init(seed_key(seed))), own)
    kept = [dict(initial_personal) for _ in data]
    for number in range(1, rounds + 1):
        total, weights = None, 0
        for index, (x, y, _, _) in enumerate(data):
            start = unflatten_params(template, join(order, shared, kept[index]))
            trained, _ = train_local(
                task, start, x, y, plan, node_id=node_id(index), round_number=number
            )
            new_shared, kept[index] = split(flatten_params(trained), own)
            weighted = {k: v.astype(np.float64) * len(y) for k, v in new_shared.items()}
            total = weighted if total is None else {k: total[k] + weighted[k] for k in total}
            weights += len(y)
        assert total is not None
        shared = {k: (v / weights).astype(np.float32) for k, v in total.items()}
    return template, order, shared, kept


def held_out_accuracies(template, order, shared, kept, data) -> list[float]:
    return [
        float(accuracy(unflatten_params(template, join(order, shared, own)), hx, hy))
        for own, (_, _, hx, hy) in zip(kept, data, strict=True)
    ]


def fine_tuned_accuracies(task, template, shared, data, *, plan, rounds) -> list[float]:
    """FedAvg's global after one local epoch on each node's training examples."""
    results = []
    for index, (x, y, hx, hy) in enumerate(data):
        start = unflatten_params(template, shared)
        tuned, _ = train_local(
            task, start, x, y, plan, node_id=node_id(index), round_number=rounds + 1
        )
        results.append(float(accuracy(tuned, hx, hy)))
    return results


def run(seed: int, *, nodes: int, rounds: int, alpha: float) -> dict[str, float]:
    data = node_data(seed, nodes, alpha)
    plan = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=seed)
    fedavg_task, personal_task = make_task(False), make_task(True)
    template, order, shared, kept = federate(fedavg_task, data, seed=seed, rounds=rounds, plan=plan)
    fedavg = held_out_accuracies(template, order, shared, kept, data)
    tuned = fine_tuned_accuracies(fedavg_task, template, shared, data, plan=plan, rounds=rounds)
    template, order, shared, kept = federate(
        personal_task, data, seed=seed, rounds=rounds, plan=plan
    )
    personal = held_out_accuracies(template, order, shared, kept, data)
    return {
        "fedavg": statistics.mean(fedavg),
        "fedavg+ft": statistics.mean(tuned),
        "personal": statistics.mean(personal),
        "classes_per_node": statistics.mean(len(set(d[1].tolist())) for d in data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args()
    print(
        f"digits, {args.nodes} nodes, Dirichlet({args.alpha}), {args.rounds} rounds: mean over "
        "nodes of each node's held-out accuracy"
    )
    print(f"{'seed':>4}  {'classes/node':>12}  {'fedavg':>8}  {'fedavg+ft':>9}  {'personal':>8}")
    rows = []
    for seed in args.seeds:
        row = run(seed, nodes=args.nodes, rounds=args.rounds, alpha=args.alpha)
        rows.append(row)
        print(
            f"{seed:>4}  {row['classes_per_node']:>12.1f}  {row['fedavg']:>8.4f}  "
            f"{row['fedavg+ft']:>9.4f}  {row['personal']:>8.4f}"
        )
    means = {k: statistics.mean(r[k] for r in rows) for k in ("fedavg", "fedavg+ft", "personal")}
    print(
        f"{'mean':>4}  {'':>12}  {means['fedavg']:>8.4f}  {means['fedavg+ft']:>9.4f}  "
        f"{means['personal']:>8.4f}"
    )
    print(
        f"personal - fedavg: {means['personal'] - means['fedavg']:+.4f}; "
        f"personal - fedavg+ft: {means['personal'] - means['fedavg+ft']:+.4f}"
    )


if __name__ == "__main__":
    main()
