"""Time to reach a test accuracy (default 0.90) on the reference task (digits-mlp, 10
nodes, 3 of them slow) in synchronous rounds, in rounds closed by a quorum at a short
deadline, and in asynchronous mode (FedBuff, ``--mode async --buffer K``): real
federations, the same budget of node updates for every configuration.

Each run is ``fedmq demo --nodes 10 --seed S --slow-nodes 3:0.5 --rounds R ...`` (mosquitto,
an aggregator, 10 node processes), one at a time, the configurations of a seed one after
the other, so a slower machine moment hits them all alike. From the report's rows: the
first version whose central accuracy reaches the target gives the time (its ``elapsed``,
seconds since the aggregator published the first model, so the nodes' start-up and JIT
compile are in it), the version number and the node updates made into models up to it;
"after v1" is the same time less the first version's ``elapsed``, i.e. without the
start-up, which all configurations pay alike. R is the budget over the updates a version
is made from: 10 per round, 7 with ``--min-nodes 7``, K in async mode.

    .venv/bin/python bench/async_time.py [--budget 300] [--seeds 0 1 2] [--target 0.9]
        [--configs sync quorum7 async-k3 async-k5] [--config NAME='DEMO ARGS' ...]
        [--json out.json]
"""

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

NODES = 10
SLOW = "3:0.5"  # node-08..node-10 take 0.5 s longer per local training
# The quorum's deadline: rounds close as soon as the 7 fast nodes are in and this has
# passed. A fast node's round trip is tens of ms here and a slow one's over 0.5 s, so any
# deadline between them closes on the fast 7; a short one wastes least waiting.
QUORUM_DEADLINE = 0.1
CONFIGS = {
    "sync": [],
    "quorum7": ["--min-nodes", "7", "--round-timeout", str(QUORUM_DEADLINE)],
    "async-k3": ["--mode", "async", "--buffer", "3"],
    "async-k5": ["--mode", "async", "--buffer", "5"],
}


def updates_per_version(args: list[str]) -> int:
    """The updates a version is made from: K (async), the quorum, or every node."""
    for flag in ("--buffer", "--min-nodes"):
        if flag in args:
            return int(args[args.index(flag) + 1])
    return NODES


def run_demo(name: str, extra: list[str], seed: int, budget: int) -> dict[str, Any]:
    """One federation's report (a failed run stops the benchmark loudly)."""
    rounds = math.ceil(budget / updates_per_version(extra))
    with tempfile.TemporaryDirectory() as workdir:
        report = Path(workdir) / "report.json"
        command = [
            sys.executable, "-m", "fedmq", "demo", "--nodes", str(NODES), "--seed", str(seed),
            "--slow-nodes", SLOW, "--rounds", str(rounds), *extra, "--report", str(report),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
        written = json.loads(report.read_text())
    if len(written["rounds"]) != rounds or written["seed"] != seed:
        raise SystemExit(f"{name} seed {seed}: the report names another run: {written}")
    return written


def updates_in(row: dict[str, Any], per_version: int) -> int:
    """Node updates a version was made from: participants in rounds; in async mode a
    node may have several in one buffer, and a full buffer holds exactly K."""
    return per_version if row.get("closed_by") == "buffer_full" else int(row["participants"])


def summarise(report: dict[str, Any], per_version: int, target: float) -> dict[str, Any]:
    """Time, versions and updates to ``target``, and what else the run shows."""
    rows = report["rounds"]
    reached = next((r for r in rows if (r["accuracy"] or 0.0) >= target), None)
    used = 0
    for row in rows:
        used += updates_in(row, per_version)
        if row is reached:
            break
    rejected: Counter[str] = Counter()
    for row in rows:
        rejected.update(row.get("rejected") or {})
    staleness = [r["staleness_mean"] for r in rows if r.get("staleness_mean") is not None]
    return {
        "seconds": None if reached is None else reached["elapsed"],
        "after_v1": None if reached is None else reached["elapsed"] - rows[0]["elapsed"],
        "versions": None if reached is None else reached["round"],
        "updates": None if reached is None else used,
        "final_accuracy": report["final_accuracy"],
        "peak_accuracy": max(r["accuracy"] or 0.0 for r in rows),
        "total_seconds": rows[-1]["elapsed"],
        "first_version_seconds": rows[0]["elapsed"],
        "rounds": len(rows),
        "updates_total": sum(updates_in(r, per_version) for r in rows),
        "closed_by": dict(Counter(r["closed_by"] for r in rows)),
        "rejected": dict(rejected),
        "restarts": (report.get("restarts") or {}).get("total"),
        "staleness_mean": statistics.fmean(staleness) if staleness else None,
        "staleness_max": max(
            (r["staleness_max"] for r in rows if "staleness_max" in r), default=None
        ),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mean(values: list[float | None]) -> float | None:
    """Mean over the seeds; None if any seed missed (a miss is not averaged away), or none."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present and len(present) == len(values) else None


def ratio(base: float | None, other: float | None) -> float | None:
    return None if base is None or other is None or other <= 0 else base / other


def mean_of(key: str, runs: list[dict[str, Any]]) -> float | None:
    return mean([run[key] for run in runs])


def table(figures: dict[str, list[dict[str, Any]]], seeds: list[int], target: float) -> str:
    """A markdown row per configuration and seed, and one of the means; speed-ups and
    accuracy gaps against sync's run of the same seed (the mean row: of the means)."""
    base = figures.get("sync")
    lines = [
        f"| config | time to {target:g} (s) | after v1 (s) | versions | updates | final acc "
        "| speed-up vs sync | speed-up after v1 | final vs sync (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in figures.items():
        rows = [(f"seed {s}", [i]) for i, s in enumerate(seeds)]
        for label, picked in [*rows, ("mean", list(range(len(runs))))]:
            chosen = [runs[i] for i in picked]
            bases = [base[i] for i in picked] if base else []
            speed = ratio(mean_of("seconds", bases), mean_of("seconds", chosen))
            after = ratio(mean_of("after_v1", bases), mean_of("after_v1", chosen))
            final, final_base = mean_of("final_accuracy", chosen), mean_of("final_accuracy", bases)
            gap = None if final is None or final_base is None else 100 * (final - final_base)
            lines.append(
                f"| {name} {label} | {fmt(mean_of('seconds', chosen), '.1f')} "
                f"| {fmt(mean_of('after_v1', chosen), '.2f')} "
                f"| {fmt(mean_of('versions', chosen), '.1f')} "
                f"| {fmt(mean_of('updates', chosen), '.0f')} | {fmt(final, '.4f')} "
                f"| {fmt(speed, '.2f')}x | {fmt(after, '.2f')}x | {fmt(gap, '+.1f')} |"
            )
    return "\n".join(lines)


def parse_config(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--config {text!r}: expected NAME='DEMO ARGS', e.g. "
                         "k5-poly0='--mode async --buffer 5 --staleness poly:0'")  # fmt: skip
    return name, shlex.split(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=300, help="node updates per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--config", action="append", default=[], type=parse_config,
                        help="another configuration: NAME='DEMO ARGS'")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs} | dict(args.config)
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for seed in args.seeds:
        for name, extra in configs.items():
            started = time.perf_counter()
            per_version = updates_per_version(extra)
            report = run_demo(name, extra, seed, args.budget)
            run = summarise(report, per_version, args.target) | {"seed": seed, "args": extra}
            figures[name].append(run)
            print(
                f"{name} seed {seed}: {args.target:g} at {fmt(run['seconds'], '.2f')} s "
                f"(after v1 {fmt(run['after_v1'], '.2f')} s, version {run['versions']}, "
                f"{run['updates']} updates); final {run['final_accuracy']:.4f} "
                f"peak {run['peak_accuracy']:.4f} after {run['rounds']} versions "
                f"({run['updates_total']} updates) in {run['total_seconds']:.1f} s; "
                f"first version {run['first_version_seconds']:.1f} s; closed_by "
                f"{run['closed_by']}; rejected {run['rejected']}; restarts {run['restarts']}; staleness mean "
                f"{fmt(run['staleness_mean'], '.2f')} max {run['staleness_max']} "
                f"(wall {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print(
        f"\n10 nodes, --slow-nodes {SLOW}, budget {args.budget} node updates per run, seeds "
        f"{args.seeds}. Time: the report's elapsed at the first version with accuracy >= "
        f"{args.target:g} ('-': never reached); after v1: less the first version's elapsed "
        "(start-up and JIT). Speed-up: sync's time over the config's (same seed; mean row: "
        "of the means). Configs: "
        + "; ".join(f"{n} = {shlex.join(a) or '(default)'}" for n, a in configs.items())
    )
    print(table(figures, args.seeds, args.target))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
