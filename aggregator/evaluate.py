"""Test-set evaluation on the aggregator, in numpy (the aggregator needs no JAX)."""

import numpy as np

from fedmq.datasets import Dataset
from fedmq.models import MLP, cross_entropy_and_accuracy


def evaluate(model: MLP, params: dict[str, np.ndarray], test: Dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``params`` on ``test``.

    A diverged model overflows here: the loss is then NaN or Inf (the round's metrics
    send it as nil: ``checkpoint.metrics_payload``), which is a result, not a warning."""
    with np.errstate(over="ignore", invalid="ignore"):
        return cross_entropy_and_accuracy(model.logits(params, test.x), test.y)
