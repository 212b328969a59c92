"""Per task: final central and federated metrics, bytes per round, node peak RSS and time
per round, from real federations (``fedmq demo``: mosquitto, an aggregator, node processes).

    .venv/bin/python bench/tasks.py [--nodes 5] [--rounds 20] [--task T ...] [--json OUT]

Each task runs as its own ``fedmq demo`` with the same nodes, rounds and seed, one after
the other (never in parallel), ``digits-mlp`` first as the baseline of the same run. A
``--task`` may add demo options after a space: ``--task "my_task:task --data-dir DIR"``.

- metrics: ``final_metrics`` of the report (central: the aggregator's test set, if it has
  one; federated: the nodes' held-out examples, of the model the last round started from).
- bytes per round: median over rounds of uplink + downlink bytes as the report counts them.
- ms per round: median over rounds 2.. of the time between consecutive rounds' metrics
  (round 1 carries the start-up and the JIT compile), and the median local training time.
- node peak RSS: VmHWM from /proc of every node process, sampled every 0.2 s while the
  demo runs; the largest seen over the nodes (the last sample before a node exits).
"""

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_TASKS = ["digits-mlp", "digits-cnn", "activity-cnn", "diabetes-mlp"]


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def is_node(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"node" in argv[:4]


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_task(
    spec: str, *, nodes: int, rounds: int, seed: int, eval_fraction: str, work: Path
) -> dict[str, Any]:
    task, *extra = shlex.split(spec)
    report = work / "report.json"
    argv = [sys.executable, "-m", "fedmq", "demo", "--task", task, "--nodes", str(nodes),
            "--rounds", str(rounds), "--seed", str(seed), "--report", str(report),
            "--workdir", str(work / "demo"), "--eval-fraction", eval_fraction,
            *extra]  # fmt: skip
    started = time.monotonic()
    peaks: dict[int, float] = {}
    with (work / "demo.log").open("wb") as log:
        demo = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        while demo.poll() is None:
            for pid in children(demo.pid):
                if pid in peaks or is_node(pid):
                    peak = peak_rss_mib(pid)
                    if peak is not None:
                        peaks[pid] = max(peak, peaks.get(pid, 0.0))
            time.sleep(0.2)
    if demo.returncode != 0:
        tail = (work / "demo.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{task}: the demo exited {demo.returncode}: {' | '.join(tail)}")
    result = json.loads(report.read_text())
    rows = result["rounds"]
    walls = [b["at"] - a["at"] for a, b in itertools.pairwise(rows)]
    return {
        "task": spec,
        "seconds": round(time.monotonic() - started, 1),
        "final_metrics": result.get("final_metrics"),
        "final_accuracy": result.get("final_accuracy"),
        "bytes_per_round": statistics.median(r["uplink_bytes"] + r["downlink_bytes"] for r in rows),
        "ms_per_round": statistics.median(walls) * 1e3 if walls else None,
        "train_ms": statistics.median(r["train_seconds_median"] for r in rows[1:] or rows) * 1e3,
        "node_peak_rss_mib": max(peaks.values()) if peaks else None,
        "nodes_seen": len(peaks),
    }


def metrics_text(metrics: dict[str, Any] | None, part: str) -> str:
    values = (metrics or {}).get(part) or {}
    return " ".join(f"{name} {value:.4g}" for name, value in sorted(values.items())) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", action="append", help="a task (repeat); default: the built-ins")
    parser.add_argument(
        "--eval-fraction",
        default="0.2",
        help="the demos' --eval-fraction (default 0.2: federated metrics beside the central)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    specs = args.task or DEFAULT_TASKS
    results = []
    print(
        f"{args.nodes} nodes, {args.rounds} rounds, seed {args.seed}, eval fraction "
        f"{args.eval_fraction}; one demo at a time"
    )
    for spec in specs:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_task(spec, nodes=args.nodes, rounds=args.rounds, seed=args.seed,
                              eval_fraction=args.eval_fraction, work=Path(tmp))  # fmt: skip
        results.append(result)
        rss = result["node_peak_rss_mib"]
        print(
            f"{spec}\n  central:   {metrics_text(result['final_metrics'], 'central')}\n"
            f"  federated: {metrics_text(result['final_metrics'], 'federated')}\n"
            f"  {result['bytes_per_round']:,.0f} B/round, {result['ms_per_round']:.0f} ms/round "
            f"(local training {result['train_ms']:.1f} ms), node peak RSS "
            f"{'-' if rss is None else f'{rss:.0f} MiB'} ({result['nodes_seen']} nodes seen), "
            f"{result['seconds']} s in all",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
