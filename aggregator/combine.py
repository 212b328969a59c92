"""How the updates held for a model version become one delta: the version's mean delta
under the configured rule (``aggregator.robust``), and the participants' training loss.

Updates are read in the order of their keys (node ids in rounds), a fixed order whatever
order they arrived in: a crashed-and-resumed run makes bitwise the same model as an
uninterrupted one. An update may come with a scale factor (the asynchronous buffer's
staleness weight): its delta is multiplied by it first, its example count is not, so a
stale update moves the model less than a fresh one of the same size.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmq.aggregator.fedavg import WeightedSum
from fedmq.aggregator.robust import Rule, aggregate, scaled
from fedmq.schemas import NodeUpdate
from fedmq.schemas.encodings import Encoded
from fedmq.schemas.tensors import Params, Shapes


@dataclass(frozen=True)
class Combined:
    delta: Params  # the mean delta (float64)
    train_loss: float  # the participants' mean training loss, weighted as their deltas
    extra: dict[str, Any]  # what the rule adds to the metrics (``Outcome.metrics``)


def scaled_delta(update: NodeUpdate, scale: float) -> Mapping[str, Encoded]:
    """``update``'s delta times ``scale`` (as sent when 1)."""
    return update.delta if scale == 1 else scaled(update.delta, scale)


def weighted_sum(
    updates: Mapping[str, NodeUpdate],
    layout: Shapes,
    scales: Mapping[str, float] | None = None,
) -> tuple[WeightedSum, float]:
    """The example-weighted sums (deltas, training loss) of ``updates`` in key order,
    each delta times its scale (default 1). Plain FedAvg's combination."""
    total = WeightedSum(layout)
    train_loss_sum = 0.0
    for key in sorted(updates):
        update = updates[key]
        total.add(scaled_delta(update, (scales or {}).get(key, 1.0)), update.num_examples)
        train_loss_sum += update.train_loss * update.num_examples
    return total, train_loss_sum


def combine(
    rule: Rule,
    updates: Mapping[str, NodeUpdate],
    layout: Shapes,
    scales: Mapping[str, float] | None = None,
) -> Combined:
    """The mean delta of ``updates`` (by key, at least one) under ``rule``, each delta
    times its scale in ``scales`` (default 1).

    Plain FedAvg is the running sum's mean; the other rules read the updates in key
    order."""
    if rule.plain:
        total, train_loss_sum = weighted_sum(updates, layout, scales)
        return Combined(total.mean(), train_loss_sum / total.total_weight, {})
    keys = sorted(updates)
    held = [updates[key] for key in keys]
    pairs = [
        (scaled_delta(updates[key], (scales or {}).get(key, 1.0)), updates[key].num_examples)
        for key in keys
    ]
    outcome = aggregate(rule, pairs, layout)
    train_loss_sum = 0.0
    for update, weight in zip(held, outcome.weights, strict=True):
        train_loss_sum += update.train_loss * weight
    return Combined(outcome.delta, train_loss_sum / sum(outcome.weights), outcome.metrics(rule))
