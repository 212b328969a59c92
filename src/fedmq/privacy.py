"""Privacy accounting for DP-SGD on a node: what its training steps cost, in epsilon.

A node's DP-SGD round (``fedmq.tasks.private_training``) is ``steps`` applications of the
sampled Gaussian mechanism: each step takes a Poisson sample of the node's examples (each
one in with probability ``q``, independently), clips every sampled example's gradient to
L2 norm C, sums and adds N(0, (Z C)^2) noise. Under add/remove-one-example adjacency one
step is ``PoissonSampledDpEvent(q, GaussianDpEvent(Z))``; a node's whole history is the
composition of its rounds' steps (the ledger, ``fedmq.node.ledger``).

The accountant is Google's ``dp_accounting`` (its RDP accountant, Mironov 2017 and
Mironov, Talwar, Zhang 2019): composing thousands of steps is a sum over a fixed list of
orders (13 ms for a 30-round ledger on the loaded test machine), and its bound is an
upper bound (never optimistic). Its PLD accountant is tighter (8.5 against 9.9 on the
reference node's 30 rounds) but took 1.9 s and +51 MiB more for the same ledger, which a
node would pay every round; bench/README.md ("Differential privacy") has the figures.

Pure: no files, no clocks, no logging; ``dp_accounting`` is imported when first used, so a
node without DP never loads it.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

# Integer orders only: dp_accounting's fractional orders below 2 do not converge for the
# sampling rates nodes use (it logs a warning per order and drops them); every integer up
# to 32, where the best order lies for epsilons from about 1 to 50, then sparser up to 256
# for smaller epsilons. Each order costs accountant time on the node every round.
RDP_ORDERS = (*range(2, 33), 40, 48, 56, 64, 80, 96, 128, 192, 256)


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
    """The epsilon of all of ``spent`` composed, at ``delta`` (RDP accountant); 0 for none.
    Equal (q, noise) are composed as one event (``grouped``), and results are cached: a
    node asks for the same ledger's epsilon again the next round."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    return _epsilon(tuple(grouped(s for s in spent if s.steps > 0)), delta)


@lru_cache(maxsize=1024)  # a node group holds many ledgers; a few hundred bytes each
def _epsilon(events: tuple[Spend, ...], delta: float) -> float:
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
