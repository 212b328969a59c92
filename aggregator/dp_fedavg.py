"""User-level differential privacy at the aggregator: DP-FedAvg (McMahan et al. 2018).

With ``--dp-fedavg noise=Z,clip=C`` a model version is made from its held updates by:

1. clipping each update's delta (as decoded: what the node's compression produced) to L2
   norm C over all tensors together;
2. summing them in node-id order, in float64, with one vote per node (not weighted by
   examples: a node's claimed example count would change how much it can move the sum);
3. adding N(0, (Z C)^2) to every coordinate, from a generator seeded with the
   aggregator's secret (never the plan's seed, which nodes know);
4. dividing by the round's expected participants (the nodes it sampled, or
   ``--nodes``), a number that does not depend on who reported.

Adding or removing one node moves the sum by at most C, so each version is the Gaussian
mechanism on the nodes' data with noise multiplier Z (add/remove-one-node adjacency). No
amplification by sampling is claimed: a round's selection is published (``selected``) and
drawn from the public plan seed, and nodes that drop out are simply absent from the sum,
which the bound covers. The run's epsilon after v versions is v such mechanisms composed
(``fedmq.privacy``, RDP), at delta 1 / N^1.1 for a fleet of N nodes.

Adaptive clipping (``clip=adaptive``, Andrew et al. 2021, "Differentially Private
Learning with Adaptive Clipping"): C starts at 0.1 and follows the target quantile
(0.5) of the nodes' update norms. Each round every participant adds the bit
b = [norm <= C]; the aggregator sums b - 1/2 (one node moves it by at most 1/2), adds
N(0, sigma_b^2) with sigma_b = m / 20 for the m expected participants, and takes the
noised fraction of unclipped deltas b~ = (that + m/2) / m; the next round's clip is
C exp(-0.2 (b~ - 0.5)) (geometric update). The count is a second Gaussian mechanism on
the same data, so the delta's sum takes noise multiplier z_delta = (Z^-2 - (2 sigma_b)^-2)
^-1/2 and the pair together is exactly one Gaussian mechanism of multiplier Z (their
Theorem 1: RDP of Gaussians adds, 1/Z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2): the run's
epsilon is still ``run_epsilon`` at Z. Needs Z < 2 sigma_b = m / 10.

What this protects: the models and metrics the aggregator publishes, against anyone who
reads them. Not the updates themselves, which travel to the aggregator (and through the
broker) as the nodes made them: that needs the nodes' own DP-SGD (``plan.dp_sgd``).

Pure: no MQTT, no files, no logging.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fedmq.privacy import Spend, epsilon
from fedmq.schemas import NodeUpdate
from fedmq.schemas.encodings import to_dense
from fedmq.schemas.tensors import Params, Shapes
from fedmq.settings import parse_dp_sgd

# Andrew et al. 2021's defaults for adaptive clipping
ADAPTIVE_START = 0.1  # the first round's clip
TARGET_QUANTILE = 0.5  # of the nodes' update norms
CLIP_LEARNING_RATE = 0.2  # of the geometric update
COUNT_NOISE_PER_NODE = 1 / 20  # sigma_b = expected participants / 20


@dataclass(frozen=True)
class DpFedAvg:
    noise: float  # Z: the noise's standard deviation over clip (the whole mechanism's)
    clip: float  # C: the L2 bound of one node's delta (adaptive: the first round's)
    adaptive: bool = False  # C follows the TARGET_QUANTILE of the update norms


class Private(NamedTuple):
    """One DP-FedAvg round: the noised mean delta, how many deltas were clipped, and how
    many were not (the count adaptive clipping noises, ``next_clip``)."""

    mean: Params
    clipped: int
    unclipped: int


def count_noise(expected: int) -> float:
    """sigma_b: the standard deviation of the noise on the count of unclipped deltas."""
    return expected * COUNT_NOISE_PER_NODE


def delta_noise(dp: DpFedAvg, expected: int) -> float:
    """The noise multiplier on the sum of deltas: Z with fixed clipping; with adaptive
    clipping z_delta = (Z^-2 - (2 sigma_b)^-2)^-1/2, so that the sum and the count together
    cost what one Gaussian mechanism of multiplier Z does (Andrew et al. 2021, Theorem 1).
    ValueError when Z >= 2 sigma_b (no z_delta is left for the sum)."""
    if not dp.adaptive:
        return dp.noise
    rest = dp.noise**-2 - (2 * count_noise(expected)) ** -2
    if rest <= 0:
        raise ValueError(
            f"--dp-fedavg noise={dp.noise!r},clip=adaptive with {expected} expected "
            f"participants: adaptive clipping needs noise below {expected / 10!r} "
            "(2 x participants / 20); use more nodes per round, less noise, or a fixed clip"
        )
    return rest**-0.5


def private_mean(
    updates: Mapping[str, NodeUpdate],
    layout: Shapes,
    dp: DpFedAvg,
    denominator: int,
    rng: np.random.Generator,
    *,
    clip: float | None = None,
    multiplier: float | None = None,
) -> Private:
    """The noised mean delta (float64) of ``updates``, read in key order, each clipped to
    ``clip`` (default ``dp.clip``; adaptive: the run's current clip), the sum noised with
    ``multiplier`` (default ``delta_noise(dp, denominator)``) times it."""
    clip = dp.clip if clip is None else clip
    multiplier = delta_noise(dp, denominator) if multiplier is None else multiplier
    if denominator < 1:
        raise ValueError(f"the expected number of participants must be >= 1, not {denominator}")
    total = {name: np.zeros(shape, np.float64) for name, shape in layout.items()}
    clipped = 0
    for key in sorted(updates):
        dense = {name: to_dense(t).astype(np.float64) for name, t in updates[key].delta.items()}
        norm = float(np.sqrt(sum(float(np.sum(np.square(a))) for a in dense.values())))
        factor = 1.0 if norm <= clip else clip / norm
        clipped += factor < 1.0
        for name, array in dense.items():
            total[name] += array * factor
    scale = multiplier * clip
    mean = {
        name: (array + rng.normal(0.0, scale, array.shape)) / denominator
        for name, array in total.items()
    }
    return Private(mean, clipped, len(updates) - clipped)


def next_clip(
    clip: float, unclipped: int, reported: int, expected: int, rng: np.random.Generator
) -> float:
    """Adaptive clipping's geometric update: ``clip`` times exp(-lr (b~ - quantile)) for
    b~ the noised fraction of the ``expected`` participants' deltas that were not clipped
    (``unclipped`` of the ``reported``), from the centred sum of (b - 1/2) so one node
    moves it by at most 1/2."""
    centred = unclipped - reported / 2 + rng.normal(0.0, count_noise(expected))
    fraction = centred / expected + 0.5
    return clip * math.exp(-CLIP_LEARNING_RATE * (fraction - TARGET_QUANTILE))


def fleet_delta(fleet: int) -> float:
    """delta = 1 / N^1.1 for N nodes: below 1/N, as user-level DP needs."""
    return 1.0 / max(fleet, 1) ** 1.1


def run_epsilon(dp: DpFedAvg, versions: int, delta: float) -> float:
    """The epsilon of ``versions`` DP-FedAvg versions at ``delta`` (each one Gaussian
    mechanism with noise multiplier Z, no sampling amplification; with adaptive clipping
    the sum at z_delta and the count at 2 sigma_b together, which is the same)."""
    return epsilon([Spend(1.0, dp.noise, versions)], delta)


def parse_dp_fedavg(text: str) -> DpFedAvg:
    """``noise=Z,clip=C`` or ``noise=Z,clip=adaptive``; ValueError naming the fix."""
    parts = [part.strip() for part in text.split(",")]
    if "clip=adaptive" not in parts:
        dp = parse_dp_sgd(text)
        return DpFedAvg(noise=dp.noise, clip=dp.clip)
    dp = parse_dp_sgd(",".join(p if p != "clip=adaptive" else "clip=1" for p in parts))
    return DpFedAvg(noise=dp.noise, clip=ADAPTIVE_START, adaptive=True)


def spec_of(dp: DpFedAvg) -> str:
    """The canonical option text: ``noise=Z,clip=C`` or ``noise=Z,clip=adaptive``."""
    return f"noise={dp.noise!r},clip={'adaptive' if dp.adaptive else repr(dp.clip)}"
