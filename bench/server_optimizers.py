"""Server optimisers (``--server-optimizer``) against FedAvg: final test accuracy of the
reference task (digits-mlp, 10 nodes) on Dirichlet label-skewed splits, real federations.

Each run is ``fedmq demo --nodes 10 --rounds R --seed S --partition dirichlet:ALPHA
--server-optimizer SPEC`` (mosquitto, an aggregator, 10 node processes), one at a time;
the figure is the report's ``final_accuracy`` (the aggregator's digits test split, the
final model). The server rates are untuned first guesses, the same for every split: a
rate tuned per split, as the paper does, may do better.

    .venv/bin/python bench/server_optimizers.py [--rounds 30] [--seeds 0 1 2]
        [--alphas 0.1 0.5] [--specs fedavg fedavgm:1,0.9 ...] [--json out.json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPECS = ["fedavg", "fedavgm:1,0.9", "fedadam:0.01", "fedyogi:0.01", "fedadagrad:0.01"]


def final_accuracy(spec: str, alpha: float, seed: int, rounds: int) -> float:
    """One federation's final test accuracy (a failed run stops the benchmark loudly)."""
    with tempfile.TemporaryDirectory() as workdir:
        report = Path(workdir) / "report.json"
        command = [
            sys.executable, "-m", "fedmq", "demo", "--nodes", "10", "--rounds", str(rounds),
            "--seed", str(seed), "--partition", f"dirichlet:{alpha}",
            "--server-optimizer", spec, "--report", str(report),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return float(json.loads(report.read_text())["final_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {}
    for alpha in args.alphas:
        for spec in args.specs:
            for seed in args.seeds:
                started = time.perf_counter()
                accuracy = final_accuracy(spec, alpha, seed, args.rounds)
                figures.setdefault(f"dirichlet:{alpha}", {}).setdefault(spec, []).append(accuracy)
                print(f"dirichlet:{alpha} {spec} seed {seed}: {accuracy:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{args.rounds} rounds, seeds {args.seeds}: final accuracy, mean (per seed); "
          "difference from fedavg in points")  # fmt: skip
    for split, by_spec in figures.items():
        base = statistics.mean(by_spec.get("fedavg", [float("nan")]))
        print(f"\n| {split} | mean | per seed | vs fedavg |\n|---|---|---|---|")
        for spec, values in by_spec.items():
            mean = statistics.mean(values)
            seeds = ", ".join(f"{v:.4f}" for v in values)
            print(f"| `{spec}` | {mean:.4f} | {seeds} | {100 * (mean - base):+.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
