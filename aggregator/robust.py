"""Robust aggregation: per-update norm clipping, coordinate-wise median and trimmed mean.

A RULE names how a round's updates become the mean delta (``parse_rule``)::

    RULE  := BASE ["+" CLIP] ["+" CAP] | CLIP ["+" CAP] | CAP   (no BASE means fedavg)
    BASE  := "fedavg" | "median" | "trimmed-mean:" BETA      0 <= BETA < 0.5
    CLIP  := "clip-norm:" X | "clip-median:" F                X, F > 0
    CAP   := "cap-examples:" C                               C >= 1, fedavg only

The aggregator's default is ``DEFAULT`` (``fedavg+clip-median:2+cap-examples:1.25``):
FedAvg in which no node counts for more than 1.25 x the round's median example count
(room for shards that differ a little) nor moves the model by more than twice the
round's median update norm: one hostile node in ten (any claim, any values the schema
admits) cannot outweigh the rest.

- ``fedavg``: the example-weighted mean (``aggregator.fedavg.WeightedSum``).
- ``cap-examples:C``: before FedAvg, every claimed ``num_examples`` above C times the
  round's low median claim (``statistics.median_low``: a claim one of the nodes made) is
  lowered to it. Fewer than half of the nodes cannot raise that median above every honest
  claim, so a node that claims 2**24 examples weighs at most C times an honest one.
- ``clip-norm:X``: before the rule, every update whose whole delta (all tensors as one
  vector, L2) has norm N > X is scaled by X / N; its direction is kept. ``clip-median:F``
  is the adaptive form: X is F times the median of this round's update norms, so it
  follows the honest nodes' scale as training converges; it cannot be pushed up by fewer
  than half of the nodes. Clipping bounds what one node moves the model by, but with
  ``fedavg`` a node still weighs in by the ``num_examples`` it claims, unless capped.
- ``median``: per coordinate, the median of the n values (for even n, the mean of the
  two middle ones). ``trimmed-mean:BETA``: per coordinate, drop the floor(BETA * n)
  largest and as many smallest values and average the rest. Both are **unweighted**: each
  node is one vote whatever ``num_examples`` it claims. A weighted median would let one
  node that lies about its example count (nothing checks it) outvote the others, which is
  the failure these rules exist to prevent; the price is that with very unequal shards
  the result leans toward the small ones. With f poisoned nodes, the median (f < n/2) and
  the trimmed mean (f <= floor(BETA * n)) stay, in every coordinate, within the range of
  the honest nodes' values.

Determinism: every function here gives bitwise the same result for the same updates in
any order (order statistics sort the values; the medians of norms and of claims sort
them). The clipped and capped FedAvg sums in the order given, which the aggregator fixes
(node-id order).

Memory: FedAvg could fold updates into a running sum one by one; an order statistic needs
all n values of a coordinate at once, so the median and trimmed mean **cannot stream**:
the round's n updates must all be held until it closes, n x model size x 4 bytes for
dense float32 updates (less for compressed ones, which stay compressed until read), as
decoded (views on the payloads, at most ``max_update_bytes`` each). So must clipping and
the examples cap, whose bounds are medians over the whole round; only plain FedAvg folds
each update in as it is accepted (``aggregator.combine.Held``). On top of that these rules
densify block by block: an (n, WORK_FLOATS // n) float32 block, sorted in place, plus
the float64 result (the size of the model): their working memory does not grow with
the model. ``memory_bound`` adds these up; ``check_memory`` refuses (at start-up) a
configuration whose bound exceeds MEMORY_LIMIT.
"""

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmq.aggregator.fedavg import WeightedSum
from fedmq.schemas.encodings import Encoded, encoding_of, shape_of
from fedmq.schemas.tensors import Params, Shapes

KINDS = ("fedavg", "median", "trimmed-mean")
# Floats per sorted block (n rows x WORK_FLOATS // n columns): 4 MiB of float32.
WORK_FLOATS = 1 << 20
# Refuse a non-streaming rule whose round would need more than this (memory_bound).
MEMORY_LIMIT = 2 << 30


@dataclass(frozen=True)
class Clip:
    """Per-update L2 clipping: a fixed bound, or ``factor`` x the round's median norm."""

    bound: float
    adaptive: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.bound < math.inf:
            raise ValueError(f"clip bound must be a positive number, got {self.bound}")

    def __str__(self) -> str:
        return f"{'clip-median' if self.adaptive else 'clip-norm'}:{_number(self.bound)}"


@dataclass(frozen=True)
class Rule:
    """A parsed RULE; ``str(rule)`` is its canonical text (what metrics record)."""

    kind: str = "fedavg"
    trim: float = 0.0  # BETA, per side; trimmed-mean only
    clip: Clip | None = None
    cap: float | None = None  # C of cap-examples:C; fedavg only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"aggregation {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "trimmed-mean" and not 0 <= self.trim < 0.5:
            raise ValueError(f"trimmed-mean needs 0 <= BETA < 0.5, got {self.trim}")
        if self.kind != "trimmed-mean" and self.trim:
            raise ValueError(f"{self.kind} takes no trim fraction")
        if self.cap is not None:
            if self.kind != "fedavg":
                raise ValueError(
                    f"{self.kind} gives each node one vote whatever it claims: "
                    "cap-examples applies to fedavg only"
                )
            if not 1 <= self.cap < math.inf:
                raise ValueError(f"cap-examples:C needs 1 <= C, got {_number(self.cap)}")

    @property
    def plain(self) -> bool:
        """Plain FedAvg: the aggregator's running sum as it always was."""
        return self.kind == "fedavg" and self.clip is None and self.cap is None

    @property
    def streams(self) -> bool:
        """Whether the rule could fold updates in one at a time (FedAvg, clipped or not)."""
        return self.kind == "fedavg"

    def __str__(self) -> str:
        base = f"trimmed-mean:{_number(self.trim)}" if self.kind == "trimmed-mean" else self.kind
        clip = "" if self.clip is None else f"+{self.clip}"
        cap = "" if self.cap is None else f"+cap-examples:{_number(self.cap)}"
        return base + clip + cap


FEDAVG = Rule()
# The aggregator's default: FedAvg that one hostile node cannot dominate (docs/aggregation.md)
DEFAULT = Rule(clip=Clip(2.0, adaptive=True), cap=1.25)

GRAMMAR = (
    "fedavg, median or trimmed-mean:BETA, optionally +clip-norm:X or +clip-median:F, "
    "and for fedavg +cap-examples:C"
)


def _number(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _value(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} needs a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} needs a finite number, got {text!r}")
    return value


def parse_rule(text: str) -> Rule:
    """A RULE (see the module docstring) or ValueError naming what is wrong."""
    parts = text.strip().split("+")
    if not all(parts):
        raise ValueError(f"aggregation {text!r} is not {GRAMMAR}")
    if parts[0].startswith(("clip-", "cap-")):
        parts.insert(0, "fedavg")
    base, clip, cap = parts[0], None, None
    if len(parts) > 1 and not parts[1].startswith("cap-"):
        clip = parts.pop(1)
    if len(parts) > 1:
        cap = parts.pop(1)
    if len(parts) > 1:
        raise ValueError(f"aggregation {text!r} is not {GRAMMAR}")
    kind, _, argument = base.partition(":")
    if kind == "trimmed-mean":
        rule = Rule(kind, trim=_value(argument, "trimmed-mean:BETA"))
    elif kind in KINDS and not argument:
        rule = Rule(kind)
    else:
        raise ValueError(f"aggregation {text!r} is not {GRAMMAR}")
    if cap is not None:
        name, _, argument = cap.partition(":")
        if name != "cap-examples":
            raise ValueError(f"aggregation {text!r}: {cap!r} is not cap-examples:C")
        rule = replace(rule, cap=_value(argument, name))
    if clip is None:
        return rule
    name, _, argument = clip.partition(":")
    if name not in ("clip-norm", "clip-median"):
        raise ValueError(f"aggregation {text!r}: {clip!r} is not clip-norm:X or clip-median:F")
    return with_clip(rule, Clip(_value(argument, name), adaptive=name == "clip-median"))


def with_clip(rule: Rule, clip: Clip) -> Rule:
    """``rule`` clipped by ``clip`` (as ``--clip-norm`` adds to ``--aggregation``)."""
    if rule.clip is not None:
        raise ValueError(f"aggregation {rule} already clips; give one clip")
    return replace(rule, clip=clip)


# ------------------------------------------------------------------------ memory


def memory_bound(rule: Rule, *, nodes: int, update_bytes: int, model_floats: int) -> int:
    """Bytes a round close needs under ``rule``, the open model aside: the ``nodes``
    updates held (``update_bytes`` each at most) and, for the rules that cannot stream,
    the sorted block and the float64 result."""
    held = nodes * update_bytes
    if rule.streams:
        return held + 8 * model_floats  # the float64 running sum
    return held + 4 * max(WORK_FLOATS, nodes) + 8 * model_floats


def check_memory(
    rule: Rule, *, nodes: int, update_bytes: int, model_floats: int, limit: int = MEMORY_LIMIT
) -> None:
    """ValueError if ``rule`` cannot stream and its ``memory_bound`` exceeds ``limit``."""
    if rule.streams:
        return
    need = memory_bound(rule, nodes=nodes, update_bytes=update_bytes, model_floats=model_floats)
    if need > limit:
        raise ValueError(
            f"aggregation {rule} holds every update of a round at once: {nodes} nodes x "
            f"{update_bytes} bytes per update need about {need / 2**20:.0f} MiB, over the "
            f"{limit / 2**20:.0f} MiB limit; use fewer nodes per round (--nodes, or "
            "--sample-fraction with --node-ids), a smaller --max-update-bytes (compressed "
            "updates) or fedavg with clipping"
        )


# ------------------------------------------------------------------------ clipping


def update_norm(delta: Mapping[str, Encoded]) -> float:
    """L2 norm of a whole update (all its tensors as one vector), summed in float64."""
    total = 0.0
    for tensor in delta.values():
        flat = encoding_of(tensor).values(tensor).astype(np.float64)
        total += float(np.sum(flat * flat))
    return math.sqrt(total)


def clip_factors(norms: Sequence[float], clip: Clip) -> tuple[list[float], float]:
    """Per-update scale factors in (0, 1] and the bound used (adaptive: F x the median
    norm, order-independent)."""
    bound = clip.bound * statistics.median(norms) if clip.adaptive else clip.bound
    return [1.0 if norm <= bound else bound / norm for norm in norms], bound


def cap_weights(claims: Sequence[int], factor: float) -> tuple[list[int], int]:
    """Each claimed example count lowered to ``factor`` x the low median claim, and that
    cap (an int >= 1: FedAvg's weights stay integers). Order-independent; one node, or
    any minority, cannot raise the low median above every other node's claim."""
    cap = max(1, math.floor(factor * statistics.median_low(claims)))
    return [min(claim, cap) for claim in claims], cap


def scaled(delta: Mapping[str, Encoded], factor: float) -> dict[str, Encoded]:
    """``delta`` times ``factor``, in the same forms (quantized: the scales; sparse: the
    values). Each number is rounded once to float32."""
    f32 = np.float32(factor)
    out: dict[str, Encoded] = {
        name: encoding_of(tensor).scaled(tensor, f32) for name, tensor in delta.items()
    }
    return out


# ------------------------------------------------------------------------ rules


def coordinatewise(
    deltas: Sequence[Mapping[str, Encoded]],
    layout: Shapes,
    reduce: Callable[[np.ndarray], np.ndarray],
    factors: Sequence[float] | None = None,
) -> Params:
    """``reduce`` applied to each coordinate's n values sorted ascending (an (n, m)
    float32 block in, m float64 out), block by block; updates optionally scaled first."""
    n = len(deltas)
    if n == 0:
        raise ValueError("no update to aggregate")
    for name, shape in layout.items():
        for delta in deltas:
            if shape_of(delta[name]) != tuple(shape):
                raise ValueError(f"{name} has shape {shape_of(delta[name])}, expected {shape}")
    scales = [np.float32(f) for f in (factors or [1.0] * n)]
    width = max(1, WORK_FLOATS // n)
    stack = np.empty((n, width), dtype=np.float32)
    result: Params = {}
    for name, shape in layout.items():
        size = math.prod(shape)
        readers = [encoding_of(delta[name]).reader(delta[name]) for delta in deltas]
        flat = np.empty(size, dtype=np.float64)
        for start in range(0, size, width):
            stop = min(start + width, size)
            block = stack[:, : stop - start]
            for row, read, scale in zip(block, readers, scales, strict=True):
                read(start, stop, row)
                if scale != 1:
                    np.multiply(row, scale, out=row)
            block.sort(axis=0)
            flat[start:stop] = reduce(block)
        result[name] = flat.reshape(shape)
    return result


def median_of_sorted(block: np.ndarray) -> np.ndarray:
    """Column medians of a column-sorted block; even n: mean of the middle two."""
    n, mid = len(block), len(block) // 2
    if n % 2:
        return block[mid].astype(np.float64)
    return (block[mid - 1].astype(np.float64) + block[mid]) / 2


def trimmed_mean_of_sorted(block: np.ndarray, beta: float) -> np.ndarray:
    """Column means of a column-sorted block without its floor(beta * n) smallest and
    largest rows (rows added in sorted order, in float64)."""
    n = len(block)
    k = math.floor(beta * n)
    return block[k : n - k].sum(axis=0, dtype=np.float64) / (n - 2 * k)


def coordinate_median(
    deltas: Sequence[Mapping[str, Encoded]],
    layout: Shapes,
    factors: Sequence[float] | None = None,
) -> Params:
    """Unweighted coordinate-wise median of the deltas (float64)."""
    return coordinatewise(deltas, layout, median_of_sorted, factors)


def trimmed_mean(
    deltas: Sequence[Mapping[str, Encoded]],
    layout: Shapes,
    beta: float,
    factors: Sequence[float] | None = None,
) -> Params:
    """Unweighted coordinate-wise mean without the floor(beta * n) extremes each side."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    return coordinatewise(deltas, layout, lambda b: trimmed_mean_of_sorted(b, beta), factors)


@dataclass(frozen=True)
class Outcome:
    delta: Params  # float64: what ``apply_mean_delta`` adds to the global model
    # The example count credited to each update: num_examples, lowered by cap-examples
    # (FedAvg's weights; the median and trimmed mean weigh deltas equally whatever these)
    weights: list[int]
    clipped: int = 0  # updates scaled down by the clip
    clip_bound: float | None = None  # the bound used this round
    capped: int = 0  # claims lowered to the examples cap
    examples_cap: int | None = None  # the cap used this round

    def metrics(self, rule: Rule) -> dict[str, Any]:
        """What the round's metrics record (``RoundMetrics.extra``)."""
        extra: dict[str, Any] = {"aggregation": str(rule)}
        if rule.clip is not None:
            extra |= {"clipped": self.clipped, "clip_bound": self.clip_bound}
        if rule.cap is not None:
            extra |= {"capped": self.capped, "examples_cap": self.examples_cap}
        return extra


def aggregate(
    rule: Rule, updates: Sequence[tuple[Mapping[str, Encoded], int]], layout: Shapes
) -> Outcome:
    """The round's delta under ``rule`` from (delta, num_examples) pairs, as decoded."""
    if not updates:
        raise ValueError("no update to aggregate")
    deltas = [delta for delta, _ in updates]
    claims = [weight for _, weight in updates]
    factors, bound = [1.0] * len(deltas), None
    if rule.clip is not None:
        factors, bound = clip_factors([update_norm(d) for d in deltas], rule.clip)
    clipped = sum(f < 1 for f in factors)
    weights, cap = claims, None
    if rule.cap is not None:
        weights, cap = cap_weights(claims, rule.cap)
    capped = sum(w < c for w, c in zip(weights, claims, strict=True))
    if rule.kind == "fedavg":
        total = WeightedSum(layout)
        for delta, weight, factor in zip(deltas, weights, factors, strict=True):
            total.add(delta if factor == 1 else scaled(delta, factor), weight)
        mean = total.mean()
    elif rule.kind == "median":
        mean = coordinate_median(deltas, layout, factors)
    else:
        mean = trimmed_mean(deltas, layout, rule.trim, factors)
    return Outcome(mean, weights, clipped, bound, capped, cap)
