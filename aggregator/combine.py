"""How the updates held for a model version become one delta: the version's mean delta
under the configured rule (``aggregator.robust``), and the participants' training loss.

Updates are read in node-id order, a fixed order whatever order they arrived in: a
crashed-and-resumed run makes bitwise the same model as an uninterrupted one.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmq.aggregator.fedavg import WeightedSum
from fedmq.aggregator.robust import Rule, aggregate
from fedmq.schemas import NodeUpdate
from fedmq.schemas.tensors import Params, Shapes


@dataclass(frozen=True)
class Combined:
    delta: Params  # the mean delta (float64)
    train_loss: float  # the participants' mean training loss, weighted as their deltas
    extra: dict[str, Any]  # what the rule adds to the metrics (``Outcome.metrics``)


def weighted_sum(updates: Mapping[str, NodeUpdate], layout: Shapes) -> tuple[WeightedSum, float]:
    """The example-weighted sums (deltas, training loss) of ``updates``, by node id, in
    node-id order. Plain FedAvg's combination."""
    total = WeightedSum(layout)
    train_loss_sum = 0.0
    for node_id in sorted(updates):
        update = updates[node_id]
        total.add(update.delta, update.num_examples)
        train_loss_sum += update.train_loss * update.num_examples
    return total, train_loss_sum


def combine(rule: Rule, updates: Mapping[str, NodeUpdate], layout: Shapes) -> Combined:
    """The mean delta of ``updates`` (by node id, at least one) under ``rule``.

    Plain FedAvg is the running sum's mean; the other rules read the updates in node-id
    order."""
    if rule.plain:
        total, train_loss_sum = weighted_sum(updates, layout)
        return Combined(total.mean(), train_loss_sum / total.total_weight, {})
    held = [updates[node_id] for node_id in sorted(updates)]
    outcome = aggregate(rule, [(u.delta, u.num_examples) for u in held], layout)
    train_loss_sum = 0.0
    for update, weight in zip(held, outcome.weights, strict=True):
        train_loss_sum += update.train_loss * weight
    return Combined(outcome.delta, train_loss_sum / sum(outcome.weights), outcome.metrics(rule))
