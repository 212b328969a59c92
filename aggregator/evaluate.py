"""Central evaluation on the aggregator's test set: ``Evaluator(params) -> {name: value}``.

The built-in MLPs are evaluated in numpy (the aggregator of a built-in task needs no JAX),
bit for bit as always; any other task through ``fedmq.tasks.evaluation.evaluate_task``
(imported only then). Either way ``loss`` is among the results, and ``accuracy`` when the
task measures it: they are the round's ``loss`` and ``accuracy`` on the wire.
"""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq.datasets import Dataset
from fedmq.models import MLP, cross_entropy_and_accuracy

Evaluator = Callable[[Mapping[str, np.ndarray]], dict[str, float]]


def evaluate(model: MLP, params: Mapping[str, np.ndarray], test: Dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``params`` on ``test``.

    A diverged model overflows here: the loss is then NaN or Inf (the round's metrics
    send it as nil: ``checkpoint.metrics_payload``), which is a result, not a warning."""
    with np.errstate(over="ignore", invalid="ignore"):
        return cross_entropy_and_accuracy(model.logits(dict(params), test.x), test.y)


def mlp_evaluator(model: MLP, test: Dataset) -> Evaluator:
    """A built-in MLP's loss and accuracy on ``test``, in numpy."""

    def evaluator(params: Mapping[str, np.ndarray]) -> dict[str, float]:
        loss, accuracy = evaluate(model, params, test)
        return {"loss": loss, "accuracy": accuracy}

    return evaluator


def evaluation_set_problem(
    model: MLP | None, task: Any, template: Any, test: Dataset
) -> str | None:
    """Why ``test`` cannot evaluate the task, in one line, or None: a built-in MLP's check
    in numpy (its features, one class id per example below its classes), any other task's
    ``data_problem`` (its loss traced on one example). Found when the aggregator starts,
    not by its first evaluation failing after round 1."""
    if model is None:
        from fedmq.tasks.training import data_problem

        return data_problem(task, template, test.x, test.y)
    features, classes = model.sizes[0], model.sizes[-1]
    if test.x.ndim != 2 or test.x.shape[1] != features:
        return f"it holds x of shape {test.x.shape}, the model takes (n, {features})"
    if not np.issubdtype(test.y.dtype, np.integer) or test.y.ndim != 1:
        return (
            f"its y must be one class id 0..{classes - 1} per example (n,), it holds "
            f"{test.y.dtype} of shape {test.y.shape}"
        )
    if int(test.y.max()) >= classes:
        return f"its y holds class {int(test.y.max())}, the model has classes 0..{classes - 1}"
    return None


def task_evaluator(task: Any, template: Any, test: Dataset) -> Evaluator:
    """Any task's metrics on ``test`` (``evaluate_task``), the named wire tensors put back
    onto the task's own tree ``template`` (``jax.eval_shape(task.init, key)``)."""
    from fedmq.tasks.evaluation import evaluate_task
    from fedmq.tasks.naming import unflatten_params

    def evaluator(params: Mapping[str, np.ndarray]) -> dict[str, float]:
        return evaluate_task(task, unflatten_params(template, params), test.x, test.y)

    return evaluator
