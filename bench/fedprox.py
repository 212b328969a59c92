"""FedProx (``--proximal-mu``) against FedAvg (mu 0): final test accuracy of the reference
task (digits-mlp, 10 nodes) on Dirichlet label-skewed splits with several local epochs,
real federations.

Each run is ``fedmq demo --nodes 10 --rounds R --seed S --partition dirichlet:ALPHA
--local-epochs E --proximal-mu MU`` (mosquitto, an aggregator, 10 node processes), one at
a time; the figure is the report's ``final_accuracy`` (the aggregator's digits test split,
the final model). FedProx's term is meant to pay off when nodes drift, i.e. with several
local epochs on skewed data, hence ``--local-epochs 5`` by default.

    .venv/bin/python bench/fedprox.py [--rounds 30] [--seeds 0 1 2] [--alphas 0.1 0.5]
        [--local-epochs 5] [--mus 0 0.01 0.1] [--json out.json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MUS = [0.0, 0.01, 0.1]


def final_accuracy(mu: float, alpha: float, seed: int, rounds: int, epochs: int) -> float:
    """One federation's final test accuracy (a failed run stops the benchmark loudly)."""
    with tempfile.TemporaryDirectory() as workdir:
        report = Path(workdir) / "report.json"
        command = [
            sys.executable, "-m", "fedmq", "demo", "--nodes", "10", "--rounds", str(rounds),
            "--seed", str(seed), "--partition", f"dirichlet:{alpha}",
            "--local-epochs", str(epochs), "--proximal-mu", str(mu), "--report", str(report),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        written = json.loads(report.read_text())
        if written.get("local_epochs") != epochs or written.get("proximal_mu", 0.0) != mu:
            raise SystemExit(f"{' '.join(command)}: the report names another run: {written}")
        return float(written["final_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--mus", type=float, nargs="+", default=MUS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {}
    for alpha in args.alphas:
        for mu in args.mus:
            for seed in args.seeds:
                started = time.perf_counter()
                accuracy = final_accuracy(mu, alpha, seed, args.rounds, args.local_epochs)
                split = figures.setdefault(f"dirichlet:{alpha}", {})
                split.setdefault(f"mu {mu:g}", []).append(accuracy)
                print(f"dirichlet:{alpha} mu {mu:g} seed {seed}: {accuracy:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{args.rounds} rounds, {args.local_epochs} local epochs, seeds {args.seeds}: final "
          "accuracy, mean (per seed); difference from mu 0 (FedAvg) in points")  # fmt: skip
    for split, by_mu in figures.items():
        base = statistics.mean(by_mu.get("mu 0", [float("nan")]))
        print(f"\n| {split} | mean | per seed | vs mu 0 |\n|---|---|---|---|")
        for name, values in by_mu.items():
            mean = statistics.mean(values)
            seeds = ", ".join(f"{v:.4f}" for v in values)
            print(f"| {name} | {mean:.4f} | {seeds} | {100 * (mean - base):+.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
