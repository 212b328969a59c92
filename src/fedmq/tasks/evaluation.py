"""Evaluating a task's model on examples: its mean loss and its metrics, example-weighted.

``evaluate_task`` cuts the examples into batches of ``batch_size`` (the last one partial:
it compiles once more, for its own size), computes each batch's mean per-example loss
(``training.example_losses``, the loss nodes minimise) and ``task.metrics`` in one jitted
call, and averages them over the batches weighted by their number of examples, in
float64. So every metric is the mean over all examples when it is itself a mean over its
batch's examples, as the Task contract asks. ``"loss"`` is always among the results (the
task's own metric of that name, if any, gives way to it).
"""

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmq.tasks.task import Task
from fedmq.tasks.training import example_losses

BatchMetrics = Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]


@lru_cache(maxsize=16)
def batch_metrics(task: Task) -> BatchMetrics:
    """``metrics(params, x, y) -> {"loss": mean loss, **task.metrics}`` of one batch, jitted."""

    @jax.jit
    def metrics(params: Any, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        found = dict(task.metrics(params, (x, y))) if task.metrics is not None else {}
        found["loss"] = jnp.mean(example_losses(task, params, x, y))
        return found

    return metrics


def evaluate_task(
    task: Task, params: Any, x: Any, y: Any, *, batch_size: int = 256
) -> dict[str, float]:
    """The task's ``loss`` and metrics of ``params`` (its own pytree) on (x, y), each the
    example-weighted mean over batches of ``batch_size``; names sorted."""
    count = len(x)
    if count == 0 or len(y) != count:
        raise ValueError(
            f"x and y must hold the same number (> 0) of examples, not {len(x)} and {len(y)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    metrics = batch_metrics(task)
    totals: dict[str, float] = {}
    for start in range(0, count, batch_size):
        xb, yb = (
            jnp.asarray(x[start : start + batch_size]),
            jnp.asarray(y[start : start + batch_size]),
        )
        weight = len(xb)
        for name, value in metrics(params, xb, yb).items():
            number = np.asarray(value, dtype=np.float64)
            if number.shape != ():
                raise ValueError(
                    f"task {task.name!r}: metric {name!r} must be a scalar, it has shape "
                    f"{number.shape}"
                )
            totals[name] = totals.get(name, 0.0) + float(number) * weight
    return {name: totals[name] / count for name in sorted(totals)}
