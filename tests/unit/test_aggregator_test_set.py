"""The aggregator's test set: ``--test-data auto`` per task, and a test set that cannot
evaluate the task refused in one line when the aggregator starts (not after round 1)."""

from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.app import build_aggregator, load_test_set
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.datasets import digits


@pytest.mark.parametrize(
    ("task", "size"), [("digits-mlp", 297), ("digits-cnn", 297), ("activity-cnn", 480),
                       ("diabetes-mlp", 88), ("mlp:8-32-3", None), ("my_tasks:task", None)],
)  # fmt: skip
def test_auto_is_the_tasks_own_test_split(task: str, size: int | None) -> None:
    test = load_test_set("auto", task)
    assert (None if test is None else len(test)) == size
    if task in ("digits-mlp", "digits-cnn"):  # the reference split, byte for byte
        assert test is not None and test.x.tobytes() == digits()[1].x.tobytes()


def _build(tmp_path: Path, task: str, x: np.ndarray, y: np.ndarray) -> None:
    path = tmp_path / "test.npz"
    np.savez(path, x=x, y=y)
    build_aggregator(AggregatorSettings(task=task, test_data=str(path)), lambda *_: None)


@pytest.mark.parametrize(
    ("task", "x", "y", "says"),
    [
        ("digits-mlp", np.ones((3, 8, 8)), np.array([0, 1, 2]),
         "it holds x of shape (3, 8, 8), the model takes (n, 64)"),
        ("digits-mlp", np.ones((3, 64)), np.array([0.5, 1, 2]),
         "its y must be one class id 0..9 per example (n,), it holds float32 of shape (3,)"),
        ("mlp:8-16-3", np.ones((3, 8)), np.array([0, 1, 3]),
         "its y holds class 3, the model has classes 0..2"),
        ("digits-cnn", np.ones((3, 5)), np.array([0, 1, 2]),
         "its loss fails on one example of x [5] float32 and y [] int32: "),
    ],
)  # fmt: skip
def test_a_test_set_that_cannot_evaluate_the_task_is_one_line(tmp_path, task, x, y, says):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as raised:
        _build(tmp_path, task, x, y)
    message = str(raised.value)
    assert message.startswith(
        f"--test-data {tmp_path / 'test.npz'}: cannot evaluate task {task}: {says}"
    ), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("task", "x", "y"),
    [
        ("mlp:8-16-3", np.ones((3, 8)), np.array([0, 1, 2])),
        ("diabetes-mlp", np.ones((3, 10)), np.array([150.0, 80.0, 230.0])),
        ("activity-cnn", np.ones((2, 128, 6)), np.array([0, 5])),
    ],
)
def test_a_test_set_that_fits_the_task_is_taken(tmp_path, task, x, y) -> None:  # type: ignore[no-untyped-def]
    _build(tmp_path, task, x, y)


@pytest.mark.parametrize(
    ("task", "central"), [("digits-cnn", True), ("diabetes-mlp", True), ("mlp:8-32-3", False)]
)
def test_an_aggregator_of_an_example_task_evaluates_centrally_by_default(
    task: str, central: bool
) -> None:
    """``fedmq aggregator --task digits-cnn`` evaluates on its test split as digits-mlp
    does; a task without one leaves it to the nodes (--eval-fraction auto: 0.2)."""
    aggregator = build_aggregator(AggregatorSettings(task=task), lambda *_: None)
    assert aggregator.settings.plan.eval_fraction == (0.0 if central else 0.2)
