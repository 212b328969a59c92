"""Turn your own data into the .npz file a fedmq node trains on (``fedmq node --data``).

The file holds two arrays: ``x``, shape (n, features), numbers (stored as float32), and
``y``, shape (n,), class ids 0..classes-1. Plain numpy arrays, no pickle.

  python make_node_data.py csv READINGS.csv node-1.npz
      a CSV with a header row; every column but the last is a feature, the last is the
      class id (an integer >= 0)
  python make_node_data.py synthetic OUT_DIR [--nodes 3] [--features 8] [--classes 3]
      made-up data to try the setup: OUT_DIR/node-1.npz ... and OUT_DIR/test.npz for the
      aggregator's --test-data

From your own Python code, the whole job is: numpy.savez("node-1.npz", x=x, y=y).
Needs only numpy.
"""

import argparse
import sys
from pathlib import Path

import numpy as np


def save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Check what fedmq checks (fedmq.datasets.load_npz), then write ``x`` and ``y``."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        sys.exit(f"{path}: x must be (n, features) and y (n,) with n > 0")
    if not np.issubdtype(y.dtype, np.integer):
        sys.exit(f"{path}: y holds {y.dtype} values; it must hold integer class ids 0, 1, 2, ...")
    if y.min() < 0:
        sys.exit(f"{path}: y holds {y.min()}; class ids are 0, 1, 2, ... (>= 0)")
    if not np.isfinite(x).all():
        sys.exit(f"{path}: x holds NaN or Inf")
    np.savez(path, x=x, y=y.astype(np.int32))
    print(f"{path}: {len(y)} examples, {x.shape[1]} features, classes {sorted(set(y.tolist()))}")


def from_csv(source: Path, target: Path) -> None:
    table = np.loadtxt(source, delimiter=",", skiprows=1, ndmin=2)
    labels = table[:, -1]
    if not np.array_equal(labels, np.round(labels)):
        sys.exit(f"{source}: the last column must hold whole-number class ids")
    save(target, table[:, :-1], labels.astype(np.int64))


def synthetic(out: Path, nodes: int, features: int, classes: int, seed: int) -> None:
    """Gaussian blobs, one centre per class; each node gets its own 200 examples."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, size=(classes, features))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        return centres[y] + rng.normal(0, 1.0, size=(n, features)), y

    out.mkdir(parents=True, exist_ok=True)
    for node in range(1, nodes + 1):
        save(out / f"node-{node}.npz", *sample(200))
    save(out / "test.npz", *sample(300))
    print(f"use --model mlp:{features}-32-{classes} on the aggregator")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("csv", help="from a CSV file: features..., class id")
    p.add_argument("csv", type=Path)
    p.add_argument("out", type=Path, help="the .npz to write")
    p = sub.add_parser("synthetic", help="made-up data for trying things out")
    p.add_argument("out", type=Path, help="directory for node-N.npz and test.npz")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.source == "csv":
        from_csv(args.csv, args.out)
    else:
        synthetic(args.out, args.nodes, args.features, args.classes, args.seed)


if __name__ == "__main__":
    main()
