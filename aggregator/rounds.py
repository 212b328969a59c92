"""Synchronous rounds, the aggregator's version policy (``aggregator.policy``): each model
version is a round that every node (or a seeded sample) is asked to train for, made when
they have all reported or at a deadline with a quorum. An explicit policy and pure
functions: who is asked to train (``select_nodes``) and whether the round is ready to
close (``close_reason``)."""

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.aggregator.policy import OpenVersion, Problem, Progress
from fedmq.schemas import NodeUpdate

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

    # ------------------------------------------------------------ as a VersionPolicy

    def select(
        self, candidates: Iterable[str], *, seed: int, version: int
    ) -> tuple[str, ...] | None:
        return select_nodes(candidates, fraction=self.sample_fraction, seed=seed, round=version)

    @property
    def window(self) -> int:
        """Only the open round's model is trained on."""
        return 0

    def key(self, update: NodeUpdate, node: str) -> str:
        """One update per node and round: held by node id."""
        return node

    def scale(self, update: NodeUpdate, current: OpenVersion) -> float:
        """Every update of a round was trained on its model: taken as sent."""
        return 1.0

    def addressed(self, update: NodeUpdate, node: str, current: OpenVersion) -> Problem | None:
        """Updates for the open round, from nodes it sampled; a resent copy of an update
        that made the previous round is a duplicate."""
        if update.round == current.number - 1 and node in current.previous_reporters:
            # a resent copy (after a reconnect) of an update the last round already has
            return "duplicate", f"{node} already reported in round {update.round}"
        if current.final or update.round != current.number:
            return "wrong_round", f"update for round {update.round}, open round is {current.number}"
        if current.selected is not None and node not in current.selected:
            return "not_selected", f"{node} was not sampled for round {current.number}"
        return None

    def fits(
        self, update: NodeUpdate, node: str, current: OpenVersion, held: Collection[str]
    ) -> Problem | None:
        """Trained from the open round's model, one update per node."""
        if update.base_model_id != current.model_id:
            return (
                "wrong_base_model",
                f"trained from {update.base_model_id}, open model is {current.model_id}",
            )
        if node in held:
            return "duplicate", f"{node} already reported in round {current.number}"
        return None

    def close_reason(self, current: OpenVersion, *, held: int, now: float) -> str | None:
        return close_reason(
            self, reported=held, opened_at=current.opened_at, now=now, selected=_count(current)
        )

    def seconds_until_check(self, current: OpenVersion, *, held: int, now: float) -> float | None:
        return seconds_until_check(
            self, opened_at=current.opened_at, now=now, reported=held, selected=_count(current)
        )

    def overdue(
        self, current: OpenVersion, *, held: int, now: float
    ) -> tuple[str, dict[str, Any]] | None:
        """Past the deadline short of the quorum: the round stays open until it is reached."""
        if self.deadline_seconds is None or now - current.opened_at < self.deadline_seconds:
            return None
        return "round.short_of_quorum", {
            "round": current.number,
            "reported": held,
            "min_nodes": quorum(self, _count(current)),
            "deadline_seconds": self.deadline_seconds,
        }

    def progress(self, current: OpenVersion) -> Progress:
        expected = self.expected_nodes if current.selected is None else len(current.selected)
        return Progress(
            expected_nodes=expected,
            min_nodes=min(self.min_nodes, expected),
            deadline_seconds=self.deadline_seconds,
        )

    def most_updates(self, fleet: int) -> int:
        """A round closes as soon as its expected nodes, or the nodes sampled from the
        fleet (``select_nodes``' count), have reported. Sampling without a node list
        draws from the nodes online, unknown here: expected_nodes stands in for them."""
        if self.sample_fraction < 1 and fleet:
            return min(fleet, max(1, math.ceil(self.sample_fraction * fleet)))
        return self.expected_nodes


def _count(current: OpenVersion) -> int | None:
    return None if current.selected is None else len(current.selected)


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
