"""How the updates held for a model version become one delta: the version's mean delta
under the configured rule (``aggregator.robust``), and the participants' training loss.

``Held`` keeps the updates accepted on the open version. Under plain FedAvg
(``Rule.plain``) it folds each one into the version's running sum as it is accepted and
drops its delta (``Held`` explains why the model still does not depend on arrival
order), so the aggregator's memory does not grow with the number of nodes. Every other
rule (clipping and the examples cap need the round's medians first; the median and the
trimmed mean need every value of a coordinate at once) holds the updates whole until the
version is made and reads them in the order of their keys (node ids in rounds), a fixed
order whatever order they arrived in: a crashed-and-resumed run makes bitwise the same
model as an uninterrupted one. An update may come with a scale factor (the asynchronous
buffer's staleness weight, known when the update is accepted): its delta is multiplied by
it first, its example count is not, so a stale update moves the model less than a fresh
one of the same size.
"""

from collections.abc import ItemsView, Iterator, Mapping, ValuesView
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


def _without_delta(update: NodeUpdate) -> NodeUpdate:
    """A copy of ``update`` with an empty delta: its fields as they are, the frozen
    dataclass's ``__init__`` skipped (``dataclasses.replace`` looks the fields up every
    call, ~10 us an update; ``NodeUpdate(**fields)`` ~3 us; this well under 1)."""
    kept = object.__new__(NodeUpdate)
    kept.__dict__.update(update.__dict__, delta={})
    return kept


class Held(Mapping[str, NodeUpdate]):
    """The updates accepted on the open version, by key, as the next version needs them.

    Under plain FedAvg each update is folded into a ``WeightedSum`` when it is accepted
    (``add``) and kept without its delta: memory is the sum (model size, float64) and a
    few fields per update, whatever the number of nodes. Under any other rule the
    updates are kept whole and combined in key order when the version is made.

    Folding in arrival order, not key order, leaves the model order-independent in
    practice. Each product ``n_i * delta_i`` is rounded once to float32 (24-bit
    significand), whatever the order, and the products are added in float64 (53 bits).
    A sum of float32 numbers is exact in float64, hence the same in every order, while
    its magnitudes fit 53 bits: when, per element, the largest summand's exponent minus
    the smallest's, plus log2 of the number of summands, is at most 29 (53 - 24). Otherwise
    two orders may round the float64 sum differently by an ulp or so (2^-53 relative),
    and that changes the model only if the float32 parameter it lands in sits within that
    distance of a float32 rounding boundary: about a 2^-29 chance per such element. A
    resumed aggregator replays its journal in arrival order, so up to the crash it adds in
    the same order as the uninterrupted run; the training loss and the metrics are
    still summed in key order, from the fields kept.
    """

    def __init__(self, rule: Rule, layout: Shapes, *, whole: bool = False) -> None:
        """``whole``: keep every update whole even under plain FedAvg (DP-FedAvg clips
        each delta when the version is made, ``aggregator.dp_fedavg``)."""
        self.rule = rule
        self.layout = layout
        self._updates: dict[str, NodeUpdate] = {}
        self._scales: dict[str, float] = {}  # kept for the rules that combine at the end
        self._sum = WeightedSum(layout) if rule.plain and not whole else None

    def add(self, key: str, update: NodeUpdate, scale: float = 1.0) -> None:
        """Hold ``update`` (whose delta matches the layout) under ``key``, its delta times
        ``scale``; under plain FedAvg, fold it in now and keep it without its delta."""
        if key in self._updates:
            raise ValueError(f"an update is already held as {key!r}")
        if self._sum is not None:
            self._sum.add(scaled_delta(update, scale), update.num_examples)
            update = _without_delta(update)
        else:
            self._scales[key] = scale
        self._updates[key] = update

    def combine(self) -> Combined:
        """The mean delta of the held updates (at least one) under the rule."""
        if self._sum is None:
            return combine(self.rule, self._updates, self.layout, self._scales)
        train_loss_sum = 0.0
        for key in sorted(self._updates):
            update = self._updates[key]
            train_loss_sum += update.train_loss * update.num_examples
        return Combined(self._sum.mean(), train_loss_sum / self._sum.total_weight, {})

    def __getitem__(self, key: str) -> NodeUpdate:
        return self._updates[key]

    def __contains__(self, key: object) -> bool:
        # Mapping's own raises and catches a KeyError for a key not held: every update's
        # duplicate check (RoundPolicy.fits) asked that, ~1.5 us.
        return key in self._updates

    def __iter__(self) -> Iterator[str]:
        return iter(self._updates)

    # The version's close reads every held update several times (participants, the
    # metrics, the staleness): ``Mapping``'s views would look each key up again.
    def values(self) -> ValuesView[NodeUpdate]:
        return self._updates.values()

    def items(self) -> ItemsView[str, NodeUpdate]:
        return self._updates.items()

    def __len__(self) -> int:
        return len(self._updates)
