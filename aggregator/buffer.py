"""Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022), the
aggregator's other version policy (``aggregator.policy``).

Nodes train whenever they hold a model and are free; nobody waits for the slowest. Every
accepted update goes into a buffer, whatever version it was trained on, and as soon as
``buffer`` updates are held the next version is made from them: from K of them when
updates come one at a time, from all that arrived together when they come faster than
versions are made (the MQTT edge ingests a received batch whole, then asks; see
``BufferPolicy``). An update trained on
version v that arrives while version t is open is ``t - v`` versions stale: its delta is
scaled by ``(1 + t - v) ** -exponent`` (a stale delta points from an older model, so it
moves the new one less), and one more than ``max_staleness`` versions stale is rejected
(``stale``). The buffer is combined like a round (``aggregator.combine``, in the order of
its keys, ``node@version``), so a resumed run makes bitwise the same versions: the
journal's order decides which buffer each update fell into.

Pure: no I/O, no clock (``now`` is an argument), no logging.
"""

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from fedmq.aggregator.policy import OpenVersion, Problem, Progress
from fedmq.aggregator.rounds import select_nodes
from fedmq.schemas import NodeUpdate

DEFAULT_EXPONENT = 0.5  # FedBuff's polynomial staleness weight, (1 + s) ** -0.5
DEFAULT_MAX_STALENESS = 20


def staleness_weight(staleness: int, exponent: float) -> float:
    """``(1 + staleness) ** -exponent``: 1 for a fresh update, smaller the staler."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0")
    return 1.0 if staleness == 0 else float((1 + staleness) ** -exponent)


def update_key(node: str, version: int) -> str:
    """``node@version``: a node trains each version at most once."""
    return f"{node}@{version}"


@dataclass(frozen=True)
class BufferPolicy:
    """Make a version every ``buffer`` accepted updates (or, with ``deadline_seconds``,
    once that long has passed with at least one held).

    At least ``buffer``: when nodes send updates faster than the aggregator makes versions
    (fast local training, a busy server), the updates queue up, and a version made from
    exactly K of them would leave the rest to grow staler version after version (each
    version starts a new update on every free node, but takes only K). The MQTT edge
    therefore hands the policy a received batch whole: the version takes every update
    that arrived with its K-th, so the queue, and the staleness, stay bounded. The
    journal holds exactly the updates a version is made from, so a resume is still
    bitwise.

    With ``sample_fraction`` below 1 each version asks a seeded sample of the nodes
    (``select_nodes``, as rounds do); a node trains on the versions that ask it."""

    buffer: int
    exponent: float = DEFAULT_EXPONENT
    max_staleness: int = DEFAULT_MAX_STALENESS
    deadline_seconds: float | None = None
    sample_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ValueError("buffer must be at least 1")
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError("the staleness exponent must be a number >= 0")
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be at least 0")
        if self.deadline_seconds is not None and not 0 < self.deadline_seconds < float("inf"):
            raise ValueError("deadline_seconds must be a positive number of seconds")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")

    @property
    def window(self) -> int:
        return self.max_staleness

    def select(
        self, candidates: Iterable[str], *, seed: int, version: int
    ) -> tuple[str, ...] | None:
        return select_nodes(candidates, fraction=self.sample_fraction, seed=seed, round=version)

    def key(self, update: NodeUpdate, node: str) -> str:
        return update_key(node, update.round)

    def addressed(self, update: NodeUpdate, node: str, current: OpenVersion) -> Problem | None:
        """Trained on the open version or one of the ``max_staleness`` before it, which
        asked this node, and newer than the node's last update a version holds."""
        if current.final:
            return "wrong_round", f"update for version {update.round}: the run is over"
        if update.round > current.number:
            return (
                "wrong_round",
                f"update for version {update.round}, newest is {current.number}",
            )
        staleness = current.number - update.round
        if staleness > self.max_staleness or update.round not in current.recent:
            return (
                "stale",
                f"trained on version {update.round}, {staleness} behind open version "
                f"{current.number} (--max-staleness {self.max_staleness})",
            )
        if update.round <= current.latest.get(node, 0):
            return (
                "duplicate",
                f"{node} already has an update from version {current.latest[node]} in a model",
            )
        selected = current.recent[update.round].selected
        if selected is not None and node not in selected:
            return "not_selected", f"{node} was not sampled for version {update.round}"
        return None

    def fits(
        self, update: NodeUpdate, node: str, current: OpenVersion, held: Collection[str]
    ) -> Problem | None:
        """Trained from the model of the version it names; once per node and version."""
        opened = current.recent[update.round]
        if update.base_model_id != opened.model_id:
            return (
                "wrong_base_model",
                f"trained from {update.base_model_id}, version {update.round} was "
                f"{opened.model_id}",
            )
        if update_key(node, update.round) in held:
            return "duplicate", f"{node} already sent its update from version {update.round}"
        return None

    def scale(self, update: NodeUpdate, current: OpenVersion) -> float:
        return staleness_weight(current.number - update.round, self.exponent)

    def close_reason(self, current: OpenVersion, *, held: int, now: float) -> str | None:
        if held >= self.buffer:
            return "buffer_full"
        if (
            self.deadline_seconds is not None
            and held >= 1
            and now - current.opened_at >= self.deadline_seconds
        ):
            return "deadline"
        return None

    def seconds_until_check(self, current: OpenVersion, *, held: int, now: float) -> float | None:
        if self.deadline_seconds is None:
            return None
        left = max(0.0, current.opened_at + self.deadline_seconds - now)
        return None if left == 0 and held == 0 else left

    def overdue(
        self, current: OpenVersion, *, held: int, now: float
    ) -> tuple[str, dict[str, Any]] | None:
        """Past the deadline with an empty buffer: the version waits for one update."""
        if self.deadline_seconds is None or now - current.opened_at < self.deadline_seconds:
            return None
        return "version.buffer_empty", {
            "round": current.number,
            "buffer": self.buffer,
            "deadline_seconds": self.deadline_seconds,
        }

    def progress(self, current: OpenVersion) -> Progress:
        return Progress(
            expected_nodes=self.buffer,
            min_nodes=1 if self.deadline_seconds is not None else self.buffer,
            deadline_seconds=self.deadline_seconds,
        )

    def most_updates(self, fleet: int) -> int:
        """K, or with updates queued the fleet's (about one each: ``fleet`` if known)."""
        return max(self.buffer, fleet)
