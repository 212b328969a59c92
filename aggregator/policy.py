"""When the aggregator makes a new model version: the interface of a version policy.

The aggregator publishes model versions (a version's number is ``round`` on the wire):
nodes train on the open version, and the next is made from the updates it accepts. A
policy answers the questions that depend on how versions are made, and nothing else:
who is asked to train on a version, whether an update is meant for the open version,
and when enough updates are held to make the next. Today's
policies are synchronous rounds (``aggregator.rounds.RoundPolicy``: a quorum, a deadline,
sampling) and an asynchronous buffer that makes a version every K updates, whatever
version each was trained on (``aggregator.buffer.BufferPolicy``, FedBuff): accepting
updates (``aggregator.intake``) and publishing (``aggregator.publisher``) call them and
need no change.

Pure: no I/O, no clock (``now`` is an argument), no logging.
"""

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedmq.schemas import NodeUpdate

# Why an update is refused: (reason slug, detail), as counted in metrics.rejected.
Problem = tuple[str, str]


@dataclass(frozen=True)
class Opened:
    """What an update trained on an earlier version is checked against."""

    model_id: str
    selected: tuple[str, ...] | None


@dataclass(frozen=True)
class OpenVersion:
    """The open model version (the global model last published), as the policy sees it."""

    number: int  # ``round`` on the wire; updates trained on it name it
    model_id: str  # its global model
    final: bool  # the run is over: this version is the last, nothing is trained on it
    selected: tuple[str, ...] | None  # the nodes asked to train on it; None: every node
    opened_at: float  # when it was published, on the aggregator's monotonic clock
    previous_reporters: frozenset[str]  # whose updates made it
    # The versions an update may still be trained on (asynchronous mode: the open one and
    # the ``max_staleness`` before it), each with its model id and the nodes it sampled.
    recent: Mapping[int, Opened] = field(default_factory=dict)
    # Asynchronous mode: each node's newest version whose update a made version holds
    # (a node trains versions in increasing order, so anything older is a resent copy).
    latest: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """What the server status says about the open version."""

    expected_nodes: int
    min_nodes: int
    deadline_seconds: float | None


class VersionPolicy(Protocol):
    """How model versions are made (see the module docstring)."""

    def select(
        self, candidates: Iterable[str], *, seed: int, version: int
    ) -> tuple[str, ...] | None:
        """The nodes asked to train on ``version``, sorted; None asks every node."""
        ...

    def key(self, update: NodeUpdate, node: str) -> str:
        """The name an accepted update is held under (and combined in the order of)."""
        ...

    def addressed(self, update: NodeUpdate, node: str, current: OpenVersion) -> Problem | None:
        """Whether a well-formed update from a known node is meant for the open version
        (checked before its compression and encoding), or why not."""
        ...

    def scale(self, update: NodeUpdate, current: OpenVersion) -> float:
        """The factor an accepted update's delta is multiplied by when the next version
        is made (1: as sent)."""
        ...

    def fits(
        self, update: NodeUpdate, node: str, current: OpenVersion, held: Collection[str]
    ) -> Problem | None:
        """Whether an update meant for it can be held for the next version (checked last:
        its base model, the nodes whose updates are ``held``), or why not."""
        ...

    def close_reason(self, current: OpenVersion, *, held: int, now: float) -> str | None:
        """Why the next version is made now from the ``held`` updates
        (``metrics.closed_by``), or None: keep accepting."""
        ...

    def seconds_until_check(self, current: OpenVersion, *, held: int, now: float) -> float | None:
        """How long the event loop may sleep before time alone could change
        ``close_reason``; None if only an update can."""
        ...

    def overdue(
        self, current: OpenVersion, *, held: int, now: float
    ) -> tuple[str, dict[str, Any]] | None:
        """A warning (event, fields) to log once when the next version is late and
        still cannot be made, or None."""
        ...

    def progress(self, current: OpenVersion) -> Progress:
        """Expected and least updates on the open version, and the deadline, for the
        server status."""
        ...

    def most_updates(self, fleet: int) -> int:
        """The most updates one version is made from (``fleet``: nodes known, or 0)."""
        ...

    @property
    def window(self) -> int:
        """How many versions before the open one an update may be trained on (0: only
        the open one); the aggregator keeps their ``Opened`` in ``OpenVersion.recent``."""
        ...
