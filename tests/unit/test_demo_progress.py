"""The figure each of the demo's round lines leads with, for any task: accuracy when the
task measures it, else the task's own metric (a regression's mse), else the loss; the
federated figure when the aggregator has no test set."""

import dataclasses

import pytest

from fedmq.demo import headline
from fedmq.schemas import RoundEvaluation
from tests.golden.samples import METRICS


@pytest.mark.parametrize(
    ("accuracy", "central", "federated", "shown"),
    [
        (0.9, {"accuracy": 0.9, "loss": 0.3}, None, "accuracy 0.9000"),
        (None, {"loss": 0.4, "mse": 2626.5, "mae": 41.0}, None, "mae 41.0000"),
        (None, {"loss": 0.4}, {"loss": 0.5, "mse": 3.0}, "loss 0.4000"),
        (None, None, {"loss": 0.5, "mse": 3.25}, "federated mse 3.2500"),
        (None, None, {"accuracy": 0.75, "loss": 0.5}, "federated accuracy 0.7500"),
        (None, None, None, "accuracy -"),
    ],
)
def test_a_round_line_leads_with_the_tasks_own_figure(accuracy, central, federated, shown):
    metrics = dataclasses.replace(
        METRICS, accuracy=accuracy, metrics=RoundEvaluation(central=central, federated=federated)
    )
    assert headline(metrics) == shown
