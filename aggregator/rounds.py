"""The round lifecycle as an explicit policy and pure functions: who is asked to train
(``select_nodes``) and whether the round is ready to close (``close_reason``)."""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# The deadline `fedmq aggregator` gives a round unless told otherwise. A healthy Pi fleet
# on the reference task never reaches it: a round there takes seconds (a few ms of CPU
# per node), and even round 1, which includes every node's JAX start-up and JIT compile
# (8 s on the loaded development machine, expected several times that on a Pi; docs/
# deploy-raspberry-pi.md 2.6), stays far below 5 minutes. What it bounds is a round
# with a missing or diverged node: 5 minutes, not forever.
DEFAULT_DEADLINE_SECONDS = 300.0


def default_quorum(nodes: int) -> int:
    """The quorum unless told otherwise: more than half of the expected nodes."""
    return nodes // 2 + 1


@dataclass(frozen=True)
class RoundPolicy:
    """When a round closes.

    A round closes as soon as ``expected_nodes`` distinct nodes have reported, or once
    ``deadline_seconds`` have passed since it opened if at least ``min_nodes`` have
    reported. With fewer than ``min_nodes`` at the deadline the round stays open (it is
    extended) until the minimum is reached. ``deadline_seconds=None`` waits for everyone.

    With ``sample_fraction`` below 1 each round asks only a seeded sample of the nodes
    (``select_nodes``); the round then expects the sampled nodes, and ``min_nodes`` is
    capped at their number.
    """

    expected_nodes: int
    min_nodes: int
    deadline_seconds: float | None = None
    sample_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.expected_nodes < 1:
            raise ValueError("expected_nodes must be at least 1")
        if not 1 <= self.min_nodes <= self.expected_nodes:
            raise ValueError("min_nodes must be between 1 and expected_nodes")
        if self.deadline_seconds is not None and not 0 < self.deadline_seconds < float("inf"):
            raise ValueError("deadline_seconds must be a positive number of seconds")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")


def select_nodes(
    population: Iterable[str], *, fraction: float, seed: int, round: int
) -> tuple[str, ...] | None:
    """The nodes asked to train in ``round``, sorted; None asks every node.

    ``ceil(fraction * N)`` of the N candidate nodes (at least one), drawn without
    replacement by a generator seeded with (seed, round): the same candidates give the
    same selection in every run and after a restart. With no candidates known yet, or
    ``fraction`` 1, nobody is left out (None)."""
    pool = sorted(set(population))
    if fraction >= 1 or not pool:
        return None
    count = min(len(pool), max(1, math.ceil(fraction * len(pool))))
    chosen = np.random.default_rng([seed, round]).choice(len(pool), size=count, replace=False)
    return tuple(sorted(pool[i] for i in chosen))


def close_reason(
    policy: RoundPolicy,
    *,
    reported: int,
    opened_at: float,
    now: float,
    selected: int | None = None,
) -> str | None:
    """``"all_reported"``, ``"deadline"`` or None (keep the round open).

    ``selected``: how many nodes this round sampled (None: no sampling)."""
    expected = policy.expected_nodes if selected is None else selected
    if reported >= expected:
        return "all_reported"
    if (
        policy.deadline_seconds is not None
        and reported >= min(policy.min_nodes, expected)
        and now - opened_at >= policy.deadline_seconds
    ):
        return "deadline"
    return None


def seconds_until_check(
    policy: RoundPolicy,
    *,
    opened_at: float,
    now: float,
    reported: int | None = None,
    selected: int | None = None,
) -> float | None:
    """How long the event loop may sleep before the deadline could change the answer;
    None if only a message can (no deadline, or it has passed short of the quorum:
    ``reported`` updates, ``selected`` as in ``close_reason``)."""
    if policy.deadline_seconds is None:
        return None
    left = max(0.0, opened_at + policy.deadline_seconds - now)
    if left == 0 and reported is not None and reported < quorum(policy, selected):
        return None
    return left


def quorum(policy: RoundPolicy, selected: int | None = None) -> int:
    """The updates a round needs to close at its deadline (capped at the sample)."""
    return min(policy.min_nodes, policy.expected_nodes if selected is None else selected)
