"""A node's first local epoch with a cold and a warm JAX compilation cache, and its memory.

    .venv/bin/python bench/node_startup.py [--model digits-mlp]

Each measurement is a fresh process, as a restarted node is: import JAX, build the
trainer, time the first epoch (compile + run), then a warm epoch. The first process
fills the cache in the node's state directory, the later ones reuse it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
from fedmq.node.app import enable_compile_cache
if sys.argv[1] != "off":
    enable_compile_cache(Path(sys.argv[1]))
import numpy as np
from fedmq.models import get_model
from fedmq.schemas import TrainingPlan
from fedmq.tasks.builtin import mlp_params
from fedmq.tasks.naming import flatten_params
from fedmq.tasks.registry import load_task
from fedmq.tasks.training import train_local
imported = time.perf_counter() - t0
model, task = get_model(sys.argv[2]), load_task(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.random((150, 64), dtype=np.float32); y = rng.integers(0, 10, 150).astype(np.int32)
params = model.init(0)
plan = TrainingPlan(0.1, 16, 1, 0)
def epoch(r):
    s = time.perf_counter()
    trained, _ = train_local(task, mlp_params(model, params), x, y, plan, node_id="n", round_number=r)
    flatten_params(trained)
    return time.perf_counter() - s
first = epoch(1)
import statistics
warm = statistics.median(epoch(r) for r in range(2, 50))
print(json.dumps({"import_s": imported, "first_epoch_s": first, "warm_epoch_s": warm,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(cache: str, model: str) -> dict[str, float]:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, cache, model],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {"no cache": [], "cold cache": [], "warm cache": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            rows["no cache"].append(run("off", args.model))
            rows["cold cache"].append(run(cache, args.model))
            rows["warm cache"].append(run(cache, args.model))
    med = statistics.median
    print(f"{args.model}, {args.repeats} fresh processes each (medians)")
    print(
        f"{'':<12} {'import s':>9} {'1st epoch ms':>13} {'warm epoch ms':>14} {'max RSS MiB':>12}"
    )
    for name, runs in rows.items():
        print(
            f"{name:<12} {med(r['import_s'] for r in runs):>9.2f} {med(r['first_epoch_s'] for r in runs) * 1e3:>13.1f}"
            f" {med(r['warm_epoch_s'] for r in runs) * 1e3:>14.3f} {med(r['max_rss_mib'] for r in runs):>12.0f}"
        )
    cold = med(r["first_epoch_s"] for r in rows["cold cache"])
    warm = med(r["first_epoch_s"] for r in rows["warm cache"])
    print(f"first epoch after a restart: {cold / warm:.1f}x faster with the persistent cache")


if __name__ == "__main__":
    main()
