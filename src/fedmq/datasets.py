"""Local data: the reference ``digits`` split and partitions, and user .npz files.

Reference task (keep exactly so): scikit-learn's bundled ``load_digits``, features / 16,
shuffled with numpy seed 0; the last 297 samples are the aggregator's test set and the
first 1500 are split over the nodes.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGITS_TRAIN = 1500
DIGITS_TEST = 297
DIGITS_FEATURES = 64  # 8 x 8 pixels
DIGITS_CLASSES = 10


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32, (n, ...): the digits' (n, 64)
    y: np.ndarray  # (n, ...): int32 class ids (the digits' (n,)), or float32 targets

    def __len__(self) -> int:
        return len(self.y)

    def save(self, path: Path) -> None:
        np.savez(path, x=self.x, y=self.y)


def digits() -> tuple[Dataset, Dataset]:
    """(train, test) of the reference task. Needs scikit-learn (the ``demo`` extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError(
            "the digits data set ships with scikit-learn: pip install 'fedmq[demo]'"
        ) from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x[order], y[order]
    train = Dataset(x[:DIGITS_TRAIN], y[:DIGITS_TRAIN])
    test = Dataset(x[-DIGITS_TEST:], y[-DIGITS_TEST:])
    return train, test


def parse_partition(spec: str) -> float | None:
    """``iid`` -> None, ``dirichlet:ALPHA`` -> ALPHA (> 0)."""
    if spec == "iid":
        return None
    kind, _, alpha = spec.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = -1.0
    if kind != "dirichlet" or not 0 < value < float("inf"):
        raise ValueError(f"partition {spec!r} is not 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")
    return value


def partition(labels: np.ndarray, nodes: int, spec: str, seed: int) -> list[np.ndarray]:
    """Index arrays, one per node: IID equal shards, or Dirichlet(alpha) over labels.

    Dirichlet: for each class, the class's (shuffled) samples are cut by proportions drawn
    from Dir(alpha); a node left empty receives one sample from the largest shard so every
    node has data to train on.
    """
    if nodes < 1 or nodes > len(labels):
        raise ValueError(f"cannot split {len(labels)} samples over {nodes} nodes")
    alpha = parse_partition(spec)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(np.arange(len(labels)), nodes)]
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(nodes)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(nodes, alpha))) * len(members)).astype(int)[:-1]
        for node, part in enumerate(np.split(members, cuts)):
            shards[node].extend(part.tolist())
    for node in range(nodes):
        if not shards[node]:
            donor = max(range(nodes), key=lambda n: len(shards[n]))
            shards[node].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


SAVE_HINT = "save it with numpy.savez(PATH, x=x, y=y)"


class _NotXAndY(Exception):
    """A readable file without arrays x and y; the message says what it holds."""


def _read_x_and_y(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as file:
        magic = file.read(6)
    # .npz is a zip archive, .npy starts with numpy's magic; anything else (CSV, pickle...)
    # would get numpy's message, which suggests loading it unsafely
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        raise _NotXAndY(f"not an .npz file (nor .npy): {SAVE_HINT}")
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy: one array
        raise _NotXAndY(f"one array (an .npy file), not an .npz holding x and y: {SAVE_HINT}")
    with loaded as archive:
        missing = [name for name in ("x", "y") if name not in archive.files]
        if missing:
            has = ", ".join(archive.files) or "nothing"
            raise _NotXAndY(
                f"cannot read x and y from it: no array {' or '.join(missing)} (it holds {has});"
                f" {SAVE_HINT}"
            )
        return archive["x"], archive["y"]


def load_npz(path: Path) -> Dataset:
    """A node's own data: an .npz with ``x`` (n, ...) numbers and ``y`` (n, ...) either
    integer class ids (>= 0) or float targets (a regression), any trailing shapes, the
    same n > 0. x is cast to float32, class ids to int32, float targets to float32.
    ValueError, one line naming the file, what is wrong and how to fix it."""
    try:
        x, y = _read_x_and_y(path)
    except OSError as error:
        reason = error.strerror or error
        raise ValueError(f"{path}: cannot read x and y from it ({reason})") from None
    except (KeyError, ValueError, EOFError) as error:  # not an .npy/.npz, or pickled objects
        raise ValueError(f"{path}: cannot read x and y from it ({error})") from None
    except _NotXAndY as error:
        raise ValueError(f"{path}: {error}") from None
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"{path}: x must be (n, ...) and y (n,) or (n, ...) with the same n > 0 examples"
            f" on their first axis; it holds x {x.shape} and y {y.shape}"
        )
    if np.iscomplexobj(x) or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{path}: x holds {x.dtype} values, not real numbers")
    if y.dtype.kind in "USO":
        raise ValueError(
            f"{path}: y holds strings; it must hold class ids 0, 1, 2, ...: map each label to"
            " its id, e.g. names, y = numpy.unique(y, return_inverse=True)"
        )
    if np.issubdtype(y.dtype, np.floating):  # a regression's targets
        targets = _as_float32(path, "y", y)
    elif np.issubdtype(y.dtype, np.integer):
        if y.min() < 0:
            raise ValueError(f"{path}: y holds {y.min()}; class ids are 0, 1, 2, ... (>= 0)")
        targets = y.astype(np.int32)
    else:  # bool, complex: neither class ids nor real targets
        raise ValueError(
            f"{path}: y holds {y.dtype} values; it must hold integer class ids 0, 1, 2, ..."
            " (store y.astype(int)) or float targets of a regression (y.astype(float))"
        )
    return Dataset(_as_float32(path, "x", x), targets)


def _as_float32(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as float32; ValueError if any is NaN or Inf (or beyond float32's range)."""
    cast = values.astype(np.float32)
    if not np.isfinite(cast).all():
        raise ValueError(f"{path}: {name} holds NaN or Inf")
    return cast


QUANTILE_BINS = 10  # a regression's y is cut into deciles for Dirichlet skew


def partition_labels(y: np.ndarray) -> np.ndarray:
    """What ``partition`` skews over: class ids as they are; a float ``y`` (regression) by
    its deciles (0..9), so ``dirichlet:ALPHA`` gives nodes different ranges of the target.
    A ``y`` with more than one value per example (n, ...) is skewed by each example's mean."""
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        return y
    key = y.reshape(len(y), -1).mean(axis=1) if y.ndim > 1 else y
    edges = np.quantile(key, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1])
    return np.searchsorted(edges, key, side="right").astype(np.int32)


def write_node_files(
    train: Dataset, test: Dataset, nodes: int, partition_spec: str, seed: int, out_dir: Path
) -> list[Path]:
    """``out_dir/node-01.npz`` ... (``train`` cut by ``partition``; two digits, three from 100
    nodes on, so they sort in order) and ``out_dir/test.npz``, each with ``x`` and ``y``:
    what ``fedmq demo --data-dir`` reads. Returns the node files' paths."""
    parts = partition(partition_labels(train.y), nodes, partition_spec, seed)
    return save_node_files([Dataset(train.x[part], train.y[part]) for part in parts], test, out_dir)


def save_node_files(shards: list[Dataset], test: Dataset | None, out_dir: Path) -> list[Path]:
    """``out_dir/node-01.npz`` ... one per shard, in order (two digits, three from 100 nodes
    on, so they sort in order), and ``out_dir/test.npz`` unless ``test`` is None: the layout
    ``fedmq demo --data-dir`` reads. Returns the node files' paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(shards))))
    paths = []
    for index, shard in enumerate(shards, start=1):
        path = out_dir / f"node-{index:0{width}d}.npz"
        shard.save(path)
        paths.append(path)
    if test is not None:
        test.save(out_dir / TEST_FILE)
    return paths


NODE_FILES = "node-*.npz"  # in a --data-dir: one node's data each, in sorted order
TEST_FILE = "test.npz"  # in a --data-dir: the aggregator's test set, if there


def data_dir_files(directory: Path) -> tuple[list[Path], Path | None]:
    """A ``--data-dir``'s node files (``node-*.npz``, sorted by name) and its ``test.npz``
    (None if it has none)."""
    test = directory / TEST_FILE
    return sorted(directory.glob(NODE_FILES)), test if test.is_file() else None
