"""A node's time per round with DP-SGD against plain training, and what accounting costs.

    .venv/bin/python bench/dp_sgd.py [--rounds 20] [--noise 1.0] [--clip 1.0] [--model digits-mlp]

The reference task (digits-mlp, or ``--model``: any built-in digits task, e.g.
digits-mlp-large; the aggregator's default plan: batch 16, 1 epoch, learning rate 0.1)
on one node's share of the reference run (shard 1 of 10 of the digits
training split), in-process, as the node trains it (``fedmq.tasks.training.train_local``
and ``fedmq.tasks.private_training.train_private``). Rounds alternate plain / DP so the
machine's load hits both alike; each is timed to the trained parameters being ready
(``block_until_ready``), after one warm-up round each (the JIT compile, reported apart).
Medians over ``--rounds``.

Accounting: the RDP epsilon of a node's ledger after 30 rounds (what ``fedmq.privacy``
computes twice a round), and dp_accounting's PLD accountant on the same events for
comparison. Memory: a fresh interpreter's peak RSS with jax and fedmq's trainer
imported, then after importing dp_accounting and computing one epsilon (what a DP node
adds), and after one PLD epsilon (what choosing PLD would add).
"""

import argparse
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from fedmq.datasets import digits, partition
from fedmq.privacy import Spend, default_delta, epsilon, sampling_rate, steps_per_round
from fedmq.schemas import DpSgd, TrainingPlan
from fedmq.tasks.private_training import train_private
from fedmq.tasks.registry import load_task
from fedmq.tasks.seeds import seed_key
from fedmq.tasks.training import train_local

# VmHWM, not getrusage's ru_maxrss: Linux carries the latter over from the parent.
MEMORY = """
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import jax, fedmq.tasks.training
base = rss()
from fedmq.privacy import Spend, epsilon
epsilon([Spend(0.107, 1.0, 300)], 1e-3)
rdp = rss()
import dp_accounting
from dp_accounting.pld import PLDAccountant
a = PLDAccountant()
a.compose(dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(0.107, dp_accounting.GaussianDpEvent(1.0)), 300))
a.get_epsilon(1e-3)
print(base, rdp, rss())
"""


def timed(run) -> float:
    started = time.perf_counter()
    params, _ = run()
    jax.block_until_ready(params)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument(
        "--model", default="digits-mlp", help="a digits task: the same 150-example shard"
    )
    args = parser.parse_args()

    task = load_task(args.model)
    train, _ = digits()
    shard = partition(train.y, 10, "iid", 0)[0]
    x, y = train.x[shard], train.y[shard]
    plan = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)
    dp = DpSgd(noise=args.noise, clip=args.clip)
    params = task.init(seed_key(0))
    rng = np.random.default_rng(1)

    def plain(number: int):
        return train_local(task, params, x, y, plan, node_id="n", round_number=number)

    def private(number: int):
        return train_private(task, params, x, y, plan, dp, rng=rng, key=jax.random.key(number))

    compile_plain, compile_dp = timed(lambda: plain(0)), timed(lambda: private(0))
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for number in range(1, args.rounds + 1):
        times["plain"].append(timed(lambda n=number: plain(n)))
        times["dp"].append(timed(lambda n=number: private(n)))
    q, steps = sampling_rate(len(x), 16), steps_per_round(len(x), 16, 1)
    plain_ms, dp_ms = (statistics.median(times[k]) * 1e3 for k in ("plain", "dp"))
    print(f"task {args.model}, noise {args.noise}, clip {args.clip}")
    print(f"node data: {len(x)} examples, batch 16 -> q {q:.4f}, {steps} steps a round")
    print(f"first round (JIT compile included): plain {compile_plain:.2f} s, DP {compile_dp:.2f} s")
    print(
        f"per round, median of {args.rounds}: plain {plain_ms:.2f} ms, DP-SGD {dp_ms:.2f} ms "
        f"({dp_ms / plain_ms:.1f}x)"
    )

    delta = default_delta(len(x))
    spent = [Spend(q, dp.noise, steps)] * 30
    epsilon(spent[:1], delta)  # dp_accounting imported: its import is not a round's cost
    started = time.perf_counter()
    rdp = epsilon(spent, delta)
    rdp_ms = (time.perf_counter() - started) * 1e3
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    started = time.perf_counter()
    accountant = PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(dp.noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps * 30))
    pld = accountant.get_epsilon(delta)
    pld_ms = (time.perf_counter() - started) * 1e3
    print(
        f"30 rounds at delta {delta:.3g}: RDP epsilon {rdp:.3f} ({rdp_ms:.0f} ms), "
        f"PLD epsilon {pld:.3f} ({pld_ms:.0f} ms)"
    )
    base, with_rdp, with_pld = map(float, subprocess.run(
        [sys.executable, "-c", MEMORY], capture_output=True, text=True, check=True
    ).stdout.split())  # fmt: skip
    print(
        f"peak RSS: jax + trainer {base:.0f} MiB, + dp_accounting and one RDP epsilon "
        f"{with_rdp:.0f} MiB (+{with_rdp - base:.0f}), + one PLD epsilon {with_pld:.0f} MiB "
        f"(+{with_pld - with_rdp:.0f})"
    )


if __name__ == "__main__":
    main()
