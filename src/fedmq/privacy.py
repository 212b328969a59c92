"""Privacy accounting for DP-SGD on a node: what its training steps cost, in epsilon.

A node's DP-SGD round (``fedmq.tasks.private_training``) is ``steps`` applications of the
sampled Gaussian mechanism: each step takes a Poisson sample of the node's examples (each
one in with probability ``q``, independently), clips every sampled example's gradient to
L2 norm C, sums and adds N(0, (Z C)^2) noise. Under add/remove-one-example adjacency one
step is ``PoissonSampledDpEvent(q, GaussianDpEvent(Z))``; a node's whole history is the
composition of its rounds' steps (the ledger, ``fedmq.node.ledger``).

The accountant is Google's ``dp_accounting`` (its RDP accountant, Mironov 2017 and
Mironov, Talwar, Zhang 2019): composing thousands of steps is a sum over a fixed list of
orders, milliseconds on a Raspberry Pi and no extra memory, and its bound is an upper
bound (never optimistic). Its PLD accountant is tighter (about 20 % lower epsilon on the
configurations tried) but takes seconds and ~150 MiB for a few thousand steps, which a
node pays every round; bench/README.md has the figures.

Pure: no files, no clocks, no logging; ``dp_accounting`` is imported when first used, so a
node without DP never loads it.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Integer orders only: dp_accounting's fractional orders below 2 do not converge for the
# sampling rates nodes use (it logs a warning per order and drops them), and integers up
# to 256 lose almost nothing at the epsilons that matter (1 to 10).
RDP_ORDERS = (*range(2, 65), 80, 96, 128, 192, 256)


@dataclass(frozen=True)
class Spend:
    """``steps`` DP-SGD steps at sampling rate ``q`` with noise multiplier ``noise``."""

    q: float
    noise: float
    steps: int


def sampling_rate(num_examples: int, batch_size: int) -> float:
    """q: each example's probability to be in one step's Poisson sample, the plan's batch
    size over the node's training examples (1 when the batch is larger than the data)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need examples and batch size >= 1, not {num_examples}, {batch_size}")
    return min(1.0, batch_size / num_examples)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: int) -> int:
    """DP-SGD steps in one round: as many as plain training takes, ceil(n / batch) per
    epoch, so one round costs what the plan's epochs suggest."""
    return local_epochs * -(-num_examples // batch_size)


def default_delta(num_examples: int) -> float:
    """delta = 1 / n^1.1: below 1/n, as it must be (a mechanism that publishes one random
    example in full is (0, 1/n)-DP, so delta >= 1/n promises nothing), with a margin that
    shrinks as n grows."""
    if num_examples < 1:
        raise ValueError(f"need examples >= 1, not {num_examples}")
    return 1.0 / num_examples**1.1


def epsilon(spent: Iterable[Spend], delta: float) -> float:
    """The epsilon of all of ``spent`` composed, at ``delta`` (RDP accountant); 0 for none."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    events = [s for s in spent if s.steps > 0]
    if not events:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(list(RDP_ORDERS))
    for s in events:
        step = dp_accounting.PoissonSampledDpEvent(s.q, dp_accounting.GaussianDpEvent(s.noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, s.steps))
    value = float(accountant.get_epsilon(delta))
    return value if math.isfinite(value) else math.inf


def grouped(spent: Iterable[Spend]) -> list[Spend]:
    """The same spending with equal (q, noise) merged, in first-seen order (what the
    accountant composes: one event per kind of step, not one per round)."""
    totals: dict[tuple[float, float], int] = {}
    for s in spent:
        totals[(s.q, s.noise)] = totals.get((s.q, s.noise), 0) + s.steps
    return [Spend(q, noise, steps) for (q, noise), steps in totals.items()]
