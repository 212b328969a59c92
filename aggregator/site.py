"""A site aggregator's round, as one update for the root: pure maths, no MQTT.

A site aggregator stands for its site's nodes at the root (docs/hierarchy.md). Per root
round it folds the updates its nodes trained on the root's global model into one update:
its delta is their example-weighted mean delta (``aggregator.combine`` under the site's
rule, the same code a flat aggregator runs), its ``num_examples`` their sum, its node id
the site's name, its round and base model the root's. The root's plain FedAvg of such
site updates is then flat FedAvg of every node's update, up to float rounding:

    flat  = sum_i f32(n_i d_i) / N                       (sums in float64)
    root  = sum_s f32(N_s f32(S_s / N_s)) / N,   S_s = sum_{i in s} f32(n_i d_i)

each site's mean is rounded once to float32 on the wire and its product with N_s once
more at the root, so per coordinate ``|root - flat| <= (2 * 2**-24 + 2**-48) * sum_s
|S_s| / N`` plus the float64 sums' own rounding: within ``TOLERANCE`` (4 x 2**-24)
relative to ``sum_i n_i |d_i| / N``. A lossy ``--upstream-compression`` (fp16, int8,
topk...) adds its own error, which its error feedback carries into the site's next
update; lossless stages (zlib) keep the bound.

Rules that need every node's update at once (a median, a trimmed mean, a clip or an
examples cap relative to the round's median) cannot be split over sites:
``split_problem`` names them. Per-update clipping to a fixed norm can (each node's
update is clipped where it is held), and so can plain FedAvg.
"""

import statistics
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.aggregator.combine import Held, combine
from fedmq.aggregator.federated_metrics import federated_metrics
from fedmq.aggregator.robust import Rule
from fedmq.compression import Pipeline
from fedmq.compression.transforms import ErrorFeedbackState
from fedmq.schemas import NodeUpdate
from fedmq.schemas.messages import MAX_EXAMPLES
from fedmq.schemas.tensors import Shapes

# Root-of-sites against flat FedAvg, per coordinate, relative to sum_i n_i |d_i| / N.
TOLERANCE = 4 * 2.0**-24


def split_problem(rule: Rule, *, where: str) -> str | None:
    """Why ``rule`` cannot be split over sites (one line, ``where`` names the option that
    asked: ``--site`` or ``--sites``), or None. At a site: fedavg, optionally with
    clip-norm:X; at the root of sites: fedavg only (a clip there would clip whole sites)."""
    fixed_clip = rule.clip is not None and not rule.clip.adaptive
    if rule.kind == "fedavg" and rule.cap is None and (rule.clip is None or fixed_clip):
        if rule.clip is None or where == "--site":
            return None
        return (
            f"{where}: aggregation {rule} would clip whole sites' updates, not nodes': give "
            "clip-norm to the site aggregators and --aggregation fedavg here"
        )
    return (
        f"{where}: aggregation {rule} cannot be split over sites (a median, a trimmed mean, "
        "clip-median or cap-examples needs every node's update of the round in one place): "
        "give --aggregation fedavg"
        + (" or fedavg+clip-norm:X" if where == "--site" else "")
        + " (docs/hierarchy.md)"
    )


@dataclass(frozen=True)
class SiteRound:
    """Which root round a site update answers, and how it travels."""

    federation: str
    site: str  # the site's name: its node id at the root
    round: int  # the root's round
    base_model_id: str  # the root's global model of that round
    pipeline: Pipeline  # --upstream-compression
    seed: int  # the root plan's seed (the compression's randomness, replayable)


def site_update(
    at: SiteRound,
    held: Mapping[str, NodeUpdate],
    layout: Shapes,
    rule: Rule,
    rng: np.random.Generator,
    residual: ErrorFeedbackState | None,
    *,
    sent_at: float,
) -> tuple[NodeUpdate, ErrorFeedbackState | None]:
    """The site's update for the root from its nodes' ``held`` updates (by node id, at
    least one) and the site's error-feedback state (None without ``ef``), with the new
    state. ValueError if the site's nodes claim more examples than one update may
    (``MAX_EXAMPLES``)."""
    if not held:
        raise ValueError("a site update needs at least one node's update")
    examples = sum(update.num_examples for update in held.values())
    if examples > MAX_EXAMPLES:
        raise ValueError(
            f"site {at.site}: its nodes hold {examples} examples, more than the "
            f"{MAX_EXAMPLES} one update may claim: split the site"
        )
    # The intake's Held has folded plain FedAvg already; a plain mapping is combined here.
    combined = held.combine() if isinstance(held, Held) else combine(rule, held, layout)
    state = residual
    if at.pipeline.error_feedback and state is None:
        state = ErrorFeedbackState({n: np.zeros(s, np.float32) for n, s in layout.items()})
    encoded, state = at.pipeline.compress(combined.delta, rng, state)
    evaluation = federated_metrics(held)
    eval_examples = sum(
        update.eval_examples or 0 for update in held.values() if update.metrics is not None
    )
    update = NodeUpdate(
        federation=at.federation,
        node_id=at.site,
        round=at.round,
        base_model_id=at.base_model_id,
        num_examples=examples,
        train_loss=combined.train_loss,
        train_seconds=statistics.median(update.train_seconds for update in held.values()),
        delta=encoded,
        compression=str(at.pipeline),
        sent_at=sent_at,
        metrics=evaluation,
        eval_examples=eval_examples if evaluation is not None else None,
        **site_privacy(held),
    )
    return update, state


def site_privacy(held: Mapping[str, NodeUpdate]) -> dict[str, float]:
    """DP-SGD (plan.dp_sgd): the site update's ``dp_epsilon`` and ``dp_delta``, the largest
    of its nodes' (each node is (eps_i, delta_i)-DP, so every one is (max eps, max delta)-DP
    for its own examples); nothing when its nodes sent none."""
    spent = [(u.dp_epsilon, u.dp_delta) for u in held.values() if u.dp_epsilon is not None]
    if not spent:
        return {}
    return {
        "dp_epsilon": max(e for e, _ in spent),
        "dp_delta": max(d for _, d in spent if d is not None),
    }


def site_rng(at: SiteRound) -> np.random.Generator:
    """The upstream compression's generator for this site and round: seeded, so a
    restarted site makes the same update again."""
    return np.random.default_rng([at.seed, zlib.crc32(at.site.encode()), at.round, 0, 2])
