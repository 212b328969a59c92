"""The reference digits split, IID and Dirichlet partitions, and users' .npz files."""

from pathlib import Path

import numpy as np
import pytest

from fedmq.datasets import (
    DIGITS_TEST,
    DIGITS_TRAIN,
    Dataset,
    digits,
    load_npz,
    parse_partition,
    partition,
)


@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    return digits()


def label_distribution(labels: np.ndarray, classes: int = 10) -> np.ndarray:
    return np.bincount(labels, minlength=classes) / len(labels)


# --------------------------------------------------------------------------- digits


def test_digits_has_the_reference_sizes_and_types(split: tuple[Dataset, Dataset]) -> None:
    train, test = split
    assert (DIGITS_TRAIN, DIGITS_TEST) == (1500, 297)
    assert len(train) == 1500
    assert len(test) == 297
    assert train.x.shape == (1500, 64)
    assert test.x.shape == (297, 64)
    for part in (train, test):
        assert part.x.dtype == np.float32
        assert part.y.dtype == np.int32
        assert part.x.min() >= 0.0
        assert part.x.max() <= 1.0
        assert set(np.unique(part.y).tolist()) == set(range(10))
    # Features are the 0..16 pixel counts divided by 16, and some pixels are saturated.
    assert train.x.max() == 1.0
    np.testing.assert_array_equal(train.x * 16, np.round(train.x * 16))


def test_digits_train_and_test_do_not_overlap(split: tuple[Dataset, Dataset]) -> None:
    train, test = split
    train_rows = {
        row.tobytes() + bytes([label]) for row, label in zip(train.x, train.y, strict=True)
    }
    test_rows = {row.tobytes() + bytes([label]) for row, label in zip(test.x, test.y, strict=True)}
    assert not train_rows & test_rows


def test_digits_is_the_same_every_call(split: tuple[Dataset, Dataset]) -> None:
    train, test = digits()
    np.testing.assert_array_equal(train.x, split[0].x)
    np.testing.assert_array_equal(train.y, split[0].y)
    np.testing.assert_array_equal(test.y, split[1].y)


# --------------------------------------------------------------------------- partitions


def assert_disjoint_cover(parts: list[np.ndarray], total: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == total, "some sample is missing or used twice"
    np.testing.assert_array_equal(np.sort(joined), np.arange(total))


@pytest.mark.parametrize("nodes", [1, 3, 5, 7])
def test_iid_gives_equal_disjoint_shards_covering_all(
    split: tuple[Dataset, Dataset], nodes: int
) -> None:
    labels = split[0].y
    parts = partition(labels, nodes, "iid", seed=0)
    assert len(parts) == nodes
    assert_disjoint_cover(parts, 1500)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if 1500 % nodes == 0:
        assert sizes == [1500 // nodes] * nodes


def test_iid_shards_look_like_the_whole(split: tuple[Dataset, Dataset]) -> None:
    labels = split[0].y
    overall = label_distribution(labels)
    for part in partition(labels, 5, "iid", seed=0):
        # Total variation distance to the overall label mix stays small.
        assert 0.5 * np.abs(label_distribution(labels[part]) - overall).sum() < 0.1


def test_dirichlet_is_disjoint_covering_and_non_empty(split: tuple[Dataset, Dataset]) -> None:
    labels = split[0].y
    parts = partition(labels, 5, "dirichlet:0.5", seed=0)
    assert len(parts) == 5
    assert_disjoint_cover(parts, 1500)
    assert all(len(p) > 0 for p in parts)
    for p in parts:
        assert p.dtype == np.int64
        np.testing.assert_array_equal(p, np.sort(p))


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_with_many_nodes_leaves_none_empty(
    split: tuple[Dataset, Dataset], seed: int
) -> None:
    """A tiny alpha over many nodes leaves shards empty before the fix-up moves one sample."""
    labels = split[0].y
    parts = partition(labels, 40, "dirichlet:0.01", seed=seed)
    assert_disjoint_cover(parts, 1500)
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_is_deterministic_per_seed(split: tuple[Dataset, Dataset]) -> None:
    labels = split[0].y
    first = partition(labels, 5, "dirichlet:0.5", seed=42)
    again = partition(labels, 5, "dirichlet:0.5", seed=42)
    other = partition(labels, 5, "dirichlet:0.5", seed=43)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_dirichlet_is_visibly_non_iid(split: tuple[Dataset, Dataset]) -> None:
    labels = split[0].y
    overall = label_distribution(labels)
    parts = partition(labels, 5, "dirichlet:0.5", seed=0)
    distances = [0.5 * np.abs(label_distribution(labels[p]) - overall).sum() for p in parts]
    # Against < 0.1 for IID shards (test above): at least one node is heavily skewed.
    assert max(distances) > 0.3
    assert np.mean(distances) > 0.2
    sizes = [len(p) for p in parts]
    assert max(sizes) > 1.5 * min(sizes)


@pytest.mark.parametrize("nodes", [0, -1, 1501])
def test_partition_rejects_impossible_node_counts(
    split: tuple[Dataset, Dataset], nodes: int
) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        partition(split[0].y, nodes, "iid", seed=0)


# --------------------------------------------------------------------------- parse_partition


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("iid", None), ("dirichlet:0.5", 0.5), ("dirichlet:1", 1.0), ("dirichlet:100", 100.0)],
)
def test_parse_partition_accepts_good_specs(spec: str, expected: float | None) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "IID",
        "iid:1",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-0.5",
        "dirichlet:abc",
        "dirichlet:nan",
        "Dirichlet:0.5",
        "dirichlet=0.5",
        "zipf:1.2",
    ],
)
def test_parse_partition_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="is not 'iid' or 'dirichlet:ALPHA'"):
        parse_partition(spec)


@pytest.mark.parametrize("spec", ["dirichlet:inf", "dirichlet:1e400"])
def test_parse_partition_rejects_infinite_alpha(spec: str) -> None:
    """Dir(inf) draws NaN proportions that partition() would cast to int (fixed in 4e3ad62)."""
    with pytest.raises(ValueError, match="is not 'iid' or 'dirichlet:ALPHA'"):
        parse_partition(spec)


# --------------------------------------------------------------------------- load_npz


def test_load_npz_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.npz"
    x = np.arange(12, dtype=np.float64).reshape(4, 3) / 10
    y = np.array([0, 2, 1, 2], dtype=np.int64)
    np.savez(path, x=x, y=y)
    data = load_npz(path)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int32
    assert len(data) == 4
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    np.testing.assert_array_equal(data.y, y)


def test_load_npz_round_trips_a_saved_dataset(tmp_path: Path) -> None:
    original = Dataset(
        np.random.default_rng(0).uniform(size=(6, 64)).astype(np.float32),
        np.arange(6, dtype=np.int32),
    )
    path = tmp_path / "shard.npz"
    original.save(path)
    loaded = load_npz(path)
    np.testing.assert_array_equal(loaded.x, original.x)
    np.testing.assert_array_equal(loaded.y, original.y)


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((3, 2))},
        {"y": np.zeros(3, np.int64)},
        {"features": np.zeros((3, 2)), "labels": np.zeros(3, np.int64)},
    ],
)
def test_load_npz_rejects_files_without_x_and_y(tmp_path: Path, arrays: dict) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="cannot read x and y"):
        load_npz(path)


def test_load_npz_rejects_a_file_that_is_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_npz(path)


def test_load_npz_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_npz(tmp_path / "absent.npz")


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (np.zeros((4, 3)), np.zeros(5, np.int64)),  # mismatched lengths
        (np.zeros((5, 3)), np.zeros(4, np.int64)),
        (np.zeros((4, 8, 8)), np.zeros((3, 2))),  # any shapes, still one n
        (np.zeros(()), np.zeros(4, np.int64)),  # x a scalar: no examples axis
        (np.zeros((4, 3)), np.zeros((), np.int64)),  # y a scalar
        (np.zeros((0, 3)), np.zeros(0, np.int64)),  # empty
    ],
)
def test_load_npz_rejects_bad_shapes(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path = tmp_path / "shapes.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(ValueError) as raised:
        load_npz(path)
    assert str(raised.value) == (
        f"{path}: x must be (n, ...) and y (n,) or (n, ...) with the same n > 0 examples on"
        f" their first axis; it holds x {x.shape} and y {y.shape}"
    )


@pytest.mark.parametrize(
    ("x_shape", "y"),
    [
        ((5, 8, 8, 1), np.arange(5) % 3),  # images: class ids
        ((5, 64, 6), np.arange(5) % 2),  # sensor windows
        ((5,), np.arange(5) % 2),  # one number per example
        ((5, 10), np.arange(15).reshape(5, 3) % 4),  # several class ids per example
    ],
)
def test_load_npz_takes_any_trailing_shape_with_class_ids(
    tmp_path: Path, x_shape: tuple[int, ...], y: np.ndarray
) -> None:
    x = np.random.default_rng(0).normal(size=x_shape)  # float64: cast on load
    path = tmp_path / "shaped.npz"
    np.savez(path, x=x, y=y)
    data = load_npz(path)
    assert data.x.shape == x_shape and data.x.dtype == np.float32
    assert data.y.shape == y.shape and data.y.dtype == np.int32
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    np.testing.assert_array_equal(data.y, y)


@pytest.mark.parametrize("y_shape", [(6,), (6, 1), (6, 4, 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_load_npz_takes_float_targets_of_a_regression(
    tmp_path: Path, y_shape: tuple[int, ...], dtype: type
) -> None:
    y = np.random.default_rng(1).normal(size=y_shape).astype(dtype)
    path = tmp_path / "regression.npz"
    np.savez(path, x=np.ones((6, 3, 2), np.float32), y=y)
    data = load_npz(path)
    assert data.y.shape == y_shape and data.y.dtype == np.float32
    np.testing.assert_array_equal(data.y, y.astype(np.float32))
    assert data.x.shape == (6, 3, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_npz_rejects_non_finite_targets(tmp_path: Path, bad: float) -> None:
    y = np.zeros((4, 2))
    y[3, 1] = bad
    path = tmp_path / "nan.npz"
    np.savez(path, x=np.zeros((4, 3)), y=y)
    with pytest.raises(ValueError) as raised:
        load_npz(path)
    assert str(raised.value) == f"{path}: y holds NaN or Inf"


@pytest.mark.parametrize("y", [np.array([True, False, True]), np.array([1j, 0j, 2j])])
def test_load_npz_rejects_targets_that_are_neither_ids_nor_real(
    tmp_path: Path, y: np.ndarray
) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, x=np.zeros((3, 2)), y=y)
    with pytest.raises(ValueError) as raised:
        load_npz(path)
    assert str(raised.value) == (
        f"{path}: y holds {y.dtype} values; it must hold integer class ids 0, 1, 2, ... (store"
        " y.astype(int)) or float targets of a regression (y.astype(float))"
    )


def test_load_npz_keeps_the_digits_bitwise(tmp_path: Path) -> None:
    """The reference shards: float32 x and int32 y come back byte for byte."""
    train, _ = digits()
    path = tmp_path / "digits.npz"
    train.save(path)
    data = load_npz(path)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int32
    assert data.x.tobytes() == train.x.tobytes() and data.y.tobytes() == train.y.tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_npz_rejects_non_finite_features(tmp_path: Path, bad: float) -> None:
    x = np.zeros((4, 3))
    x[2, 1] = bad
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_npz(path)


def test_load_npz_rejects_features_beyond_float32_range(tmp_path: Path) -> None:
    x = np.zeros((4, 3))
    x[1, 2] = 1e300  # finite in the file, inf once cast to float32
    path = tmp_path / "huge.npz"
    np.savez(path, x=x, y=np.zeros(4, np.int64))
    # load_npz's cast emits numpy's overflow RuntimeWarning (an error under this suite's
    # filterwarnings) before its own check rejects the file; silence only that.
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="NaN or Inf"):
        load_npz(path)


@pytest.mark.parametrize(
    "y", [np.array([0, 1, -1, 2]), np.array([[0, 1], [-3, 0], [1, 1], [0, 0]])]
)
def test_load_npz_rejects_labels_that_are_not_class_ids(tmp_path: Path, y: np.ndarray) -> None:
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((4, 3)), y=y)
    with pytest.raises(ValueError, match="class ids"):
        load_npz(path)


def test_load_npz_names_an_npy_file_for_what_it_is(tmp_path: Path) -> None:
    """A single .npy array got a TypeError traceback (issue 11)."""
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 3)))
    with pytest.raises(
        ValueError, match=r"x\.npy: one array \(an \.npy file\), not an \.npz.*savez"
    ):
        load_npz(path)


@pytest.mark.parametrize(("arrays", "missing"), [({"x": np.zeros((3, 2))}, "y"), ({}, "x or y")])
def test_load_npz_says_which_array_is_missing(tmp_path: Path, arrays: dict, missing: str) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, features=np.zeros(3), **arrays)
    with pytest.raises(ValueError, match=rf"no array {missing} \(it holds .*features.*savez"):
        load_npz(path)


@pytest.mark.parametrize(
    ("y", "says"),
    [
        (np.array([True, False, True, True]), r"y holds bool values; .*integer class ids.*astype"),
        (np.array(["cat", "dog", "cat", "cat"]), r"y holds strings; .*numpy\.unique"),
        (np.array([0, 1, -1, 2]), r"y holds -1; class ids are 0, 1, 2"),
    ],
)
def test_load_npz_says_what_is_wrong_with_the_labels(tmp_path: Path, y: np.ndarray, says: str):
    """Float and string labels were told "y must hold class ids >= 0" (issue 11)."""
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((4, 3)), y=y)
    with pytest.raises(ValueError, match=says):
        load_npz(path)


def test_load_npz_rejects_features_that_are_not_numbers(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    np.savez(path, x=np.array([["a"], ["b"]]), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"text\.npz: x holds <U1 values, not real numbers"):
        load_npz(path)
