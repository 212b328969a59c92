"""A round's federated metrics: the participants' evaluations of the model the round
started from, on their own held-out examples, weighted by how many each held out.

Pure: updates in, numbers out. Sums run in node-id order, so arrival order (and a resume)
never changes them.
"""

from collections.abc import Mapping

from fedmq.schemas import NodeUpdate


def federated_metrics(updates: Mapping[str, NodeUpdate]) -> dict[str, float] | None:
    """For each metric name, sum of value x eval_examples / sum of eval_examples over the
    updates (by node id) that report it; None when none carries metrics.

    Every update held counts: a rejected one never reaches here, and one the robust rule
    clipped or capped counts with its own ``eval_examples`` (clipping bounds a delta, not
    a report)."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for node_id in sorted(updates):
        update = updates[node_id]
        if update.metrics is None or not update.eval_examples:
            continue
        for name, value in update.metrics.items():
            sums[name] = sums.get(name, 0.0) + value * update.eval_examples
            weights[name] = weights.get(name, 0) + update.eval_examples
    if not sums:
        return None
    return {name: sums[name] / weights[name] for name in sorted(sums)}
