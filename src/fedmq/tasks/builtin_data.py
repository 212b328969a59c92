"""The data of each built-in task: its (train, test) split, and the train split cut per node.

- ``digits-mlp``, ``digits-mlp-large``, ``digits-cnn``: the reference digits split
  (fedmq.datasets.digits), cut per node by ``--partition`` as fedmq demo always has.
- ``activity-cnn``: the synthetic activity recordings (fedmq.tasks.activity_data). Train:
  subjects 0-9, test: subjects 100-103, whom no node has seen (a model must work for new
  people). Per node: node ``i`` is subject ``i - 1``, so nodes differ by nature (gait,
  sensor placement, noise); ``dirichlet:ALPHA`` also skews which activities each subject
  recorded (per subject, activity shares drawn from Dir(ALPHA), the largest kept whole).
- ``diabetes-mlp``: scikit-learn's diabetes data (442 patients), shuffled with numpy seed 0;
  the last 88 are the test split, the first 354 train. ``x`` standardised with the train
  split's mean and deviation, ``y`` the progression score (float). A regression has no
  classes for Dirichlet label skew: ``dirichlet:ALPHA`` skews the nodes over the deciles
  of ``y`` instead (fedmq.datasets.partition_labels), so some nodes see mostly mild cases,
  others mostly severe ones.

Needs scikit-learn (the ``demo`` extra) for digits and diabetes; the activity data needs
nothing but numpy.
"""

import numpy as np

from fedmq.datasets import (
    DIGITS_TRAIN,
    Dataset,
    digits,
    parse_partition,
    partition,
    partition_labels,
)
from fedmq.tasks.activity_data import ACTIVITIES, activity_data, subject_windows

DIGITS_TASKS = ("digits-mlp", "digits-mlp-large", "digits-cnn")
ACTIVITY_TRAIN_SUBJECTS = tuple(range(10))
ACTIVITY_TEST_SUBJECTS = (100, 101, 102, 103)
ACTIVITY_WINDOWS = 20  # per subject and activity: 120 windows (5 minutes) per subject
ACTIVITY_SEED = 0  # the data set's seed: the same recordings in every federation
DIABETES_TEST = 88
DIABETES_SIZE = 442  # patients in scikit-learn's diabetes data


def builtin_data(task_name: str) -> tuple[Dataset, Dataset] | None:
    """(train, test) of a built-in task, or None for a task without built-in data."""
    if task_name in DIGITS_TASKS:
        return digits()
    if task_name == "activity-cnn":
        return (
            Dataset(*activity_data(ACTIVITY_TRAIN_SUBJECTS, ACTIVITY_WINDOWS, ACTIVITY_SEED)),
            Dataset(*activity_data(ACTIVITY_TEST_SUBJECTS, ACTIVITY_WINDOWS, ACTIVITY_SEED)),
        )
    if task_name == "diabetes-mlp":
        return diabetes()
    return None


def node_limit(task_name: str) -> int | None:
    """The most nodes ``split_builtin`` can give data to (each at least one example; for
    ``activity-cnn`` one subject each, below the test subjects), or None without data."""
    if task_name in DIGITS_TASKS:
        return DIGITS_TRAIN
    if task_name == "activity-cnn":
        return min(ACTIVITY_TEST_SUBJECTS)
    if task_name == "diabetes-mlp":
        return DIABETES_SIZE - DIABETES_TEST
    return None


def split_builtin(
    task_name: str, nodes: int, spec: str, seed: int
) -> tuple[list[Dataset], Dataset] | None:
    """(one Dataset per node, test) of a built-in task, or None without built-in data.

    ``spec`` is ``--partition`` (``iid`` or ``dirichlet:ALPHA``), ``seed`` the federation's.
    """
    if task_name == "activity-cnn":
        alpha = parse_partition(spec)
        rng = np.random.default_rng(seed)
        shards = []
        for subject in range(nodes):
            x, y = subject_windows(subject, ACTIVITY_WINDOWS, ACTIVITY_SEED)
            keep = np.arange(len(y)) if alpha is None else _skewed(y, alpha, rng)
            shards.append(Dataset(x[keep], y[keep]))
        test = Dataset(*activity_data(ACTIVITY_TEST_SUBJECTS, ACTIVITY_WINDOWS, ACTIVITY_SEED))
        return shards, test
    data = builtin_data(task_name)
    if data is None:
        return None
    train, test = data
    parts = partition(partition_labels(train.y), nodes, spec, seed)
    return [Dataset(train.x[part], train.y[part]) for part in parts], test


def _skewed(y: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping a Dir(alpha) share of each activity, the largest share whole."""
    shares = rng.dirichlet(np.full(len(ACTIVITIES), alpha))
    keep = []
    for label, share in enumerate(shares):
        members = np.flatnonzero(y == label)
        count = round(len(members) * share / shares.max())
        keep.extend(members[:count].tolist())
    return np.asarray(sorted(keep), dtype=np.int64)


def diabetes() -> tuple[Dataset, Dataset]:
    """(train, test) of ``diabetes-mlp``: x standardised (float32), y the score (float32)."""
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise RuntimeError(
            "the diabetes data set ships with scikit-learn: pip install 'fedmq[demo]'"
        ) from None
    bunch = load_diabetes()
    order = np.random.RandomState(0).permutation(len(bunch.target))
    x, y = bunch.data[order], bunch.target[order]
    train_x, test_x = x[:-DIABETES_TEST], x[-DIABETES_TEST:]
    mean, scale = train_x.mean(axis=0), train_x.std(axis=0)
    y = y.astype(np.float32)
    return (
        Dataset(((train_x - mean) / scale).astype(np.float32), y[:-DIABETES_TEST]),
        Dataset(((test_x - mean) / scale).astype(np.float32), y[-DIABETES_TEST:]),
    )
