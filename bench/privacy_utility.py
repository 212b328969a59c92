"""The privacy-utility table of issue 17: a digits task's accuracy at a target epsilon.

    .venv/bin/python bench/privacy_utility.py [--epsilons 1,2,4,8,none] [--level example]
        [--compression dense,topk:0.035+sign+ef+flat] [--model digits-mlp] [--seed 0]
        [--out bench/results/privacy-2026-12-07.txt]

Example level (DP-SGD on the nodes): the reference run (``fedmq demo --nodes 10 --rounds
30 --seed 0``, clip 1.0) with the noise multiplier that spends exactly the target epsilon
over the run's steps on the node that spends most, by the same RDP accountant the nodes
use (``fedmq.privacy``): every node of the reference run holds 150 examples, so q =
16/150, 10 steps a round, 300 steps, delta 1/150^1.1. ``none``: no DP. ``--model``
(``fedmq demo --task``): any built-in digits task (digits-mlp, digits-mlp-large,
digits-cnn) trains on the same split, so the same calibration holds.

User level (DP-FedAvg at the aggregator, ``--level user``): ``--nodes N`` (default 100,
``--nodes-per-process 25``), 30 rounds, ``--clip`` C (default 1.0) or adaptive, the noise multiplier that spends the
target epsilon over 30 Gaussian mechanisms (no sampling amplification) at delta 1/N^1.1,
as the aggregator accounts it.

One run per cell, one at a time; each line of ``--out`` is appended as its run ends.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmq.privacy import Spend, default_delta, epsilon, sampling_rate, steps_per_round

ROUNDS = 30
EXAMPLES = 150  # each of the reference run's 10 nodes (iid shards of the 1,500 digits)
BATCH = 16  # the aggregator's default plan


def calibrate(target: float, spend, delta: float, low: float = 0.3, high: float = 50.0) -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose ``spend(noise)`` costs at most
    ``target`` epsilon at ``delta``: bisection, the epsilon falls as the noise grows."""
    if epsilon(spend(high), delta) > target:
        raise ValueError(f"epsilon {target} needs noise above {high}")
    for _ in range(100):
        if high - low <= 1e-4 * high:
            break
        middle = (low + high) / 2
        if epsilon(spend(middle), delta) > target:
            low = middle
        else:
            high = middle
    return high


def example_noise(target: float) -> tuple[float, float]:
    """(noise multiplier, delta) of DP-SGD spending ``target`` over the reference run."""
    q = sampling_rate(EXAMPLES, BATCH)
    steps = ROUNDS * steps_per_round(EXAMPLES, BATCH, 1)
    delta = default_delta(EXAMPLES)
    return calibrate(target, lambda z: [Spend(q, z, steps)], delta), delta


def user_noise(target: float, nodes: int) -> tuple[float, float]:
    """(noise multiplier, delta) of DP-FedAvg spending ``target`` over ``ROUNDS`` rounds."""
    delta = 1.0 / nodes**1.1  # aggregator.dp_fedavg.fleet_delta
    return calibrate(target, lambda z: [Spend(1.0, z, ROUNDS)], delta), delta


def run(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "fedmq", "demo", *args, "--report", str(report)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:  # why: "fedmq demo failed: ..." is on stdout
            lines = (done.stdout + done.stderr).strip().splitlines()
            telling = [line for line in lines if '"level": "info"' not in line] or lines
            tail = " | ".join(telling[-8:])
            raise RuntimeError(f"fedmq demo {' '.join(args)} failed ({done.returncode}): {tail}")
        out = json.loads(report.read_text())
        out["wall_seconds"] = time.monotonic() - started
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,2,4,8,none")
    parser.add_argument("--level", choices=("example", "user"), default="example")
    parser.add_argument("--compression", default="dense,topk:0.035+sign+ef+flat")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--clip", default="1.0", help="C, or adaptive (user level only)")
    parser.add_argument(
        "--model",
        default="digits-mlp",
        help="the task (a digits one: the same 150 examples a node)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nodes-per-process",
        type=int,
        help="fedmq demo's (default: 1 at example level, 25 at user level); 10 at example "
        "level compiles DP-SGD once instead of in ten processes at once, which on a loaded "
        "machine can miss the demo's 120 s for the first round",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/privacy-2026-12-07.txt"))
    options = parser.parse_args()
    nodes = 10 if options.level == "example" else options.nodes
    base = ["--nodes", str(nodes), "--rounds", str(ROUNDS), "--seed", str(options.seed)]
    base += ["--task", options.model]
    per_process = options.nodes_per_process or (25 if options.level == "user" else 1)
    if per_process != 1:
        base += ["--nodes-per-process", str(per_process)]
    for compression in options.compression.split(","):
        for text in options.epsilons.split(","):
            target = None if text == "none" else float(text)
            dp: list[str] = []
            noise = delta = None
            if target is not None:
                make = (
                    example_noise if options.level == "example" else lambda t: user_noise(t, nodes)
                )
                noise, delta = make(target)
                flag = "--dp-sgd" if options.level == "example" else "--dp-fedavg"
                dp = [flag, f"noise={noise:.4f},clip={options.clip}"]
            report = run([*base, "--compression", compression, *dp])
            rows = report["rounds"]
            spent = rows[-1].get("dp_epsilon_max") or rows[-1].get("dp_fedavg_epsilon")
            clips = [r["dp_fedavg_clip"] for r in rows if r.get("dp_fedavg_clip") is not None]
            line = (
                f"{options.level} model={options.model} seed={options.seed} nodes={nodes} "
                f"nodes_per_process={per_process} "
                f"compression={compression} clip={options.clip} "
                f"target_epsilon={text} "
                f"noise={noise and round(noise, 4)} delta={delta and f'{delta:.3g}'} "
                f"final_accuracy={report['final_accuracy']:.4f} spent_epsilon={spent} "
                f"rounds={len(rows)} wall_s={report['wall_seconds']:.0f}"
                + (f" clip_first={clips[0]:.4g} clip_last={clips[-1]:.4g}" if clips else "")
            )
            print(line, flush=True)
            with options.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
