"""Accepting updates: validate, journal, hold; or reject, counted by reason.

An update is checked in this order, the first problem naming the rejection (reason
slugs: docs/PROTOCOL.md, "Rejection reasons"): its topic; its size, before msgpack is
parsed; its schema against the global model's layout; its federation, node id and that
the node is known; whether it is meant for the open model version (the version policy:
its round, its node sampled, not a resend); its compression and encoding; then whether
it can be held for the next version (the policy: its base model, not a duplicate). An
accepted update is appended to the journal (the MQTT edge fsyncs it before the PUBACK)
and handed to the version's ``Holding`` (``aggregator.combine.Held``: under plain FedAvg
folded into the running sum at once), with the policy's scale for it.
"""

from collections import Counter
from collections.abc import Callable, Collection
from typing import Generic, Protocol, TypeVar

import structlog

from fedmq.aggregator.policy import OpenVersion, Problem, VersionPolicy
from fedmq.compression import parse_spec
from fedmq.schemas import NodeUpdate, SchemaError, Topics, decode_update
from fedmq.schemas.tensors import Shapes

log = structlog.get_logger()


class Journal(Protocol):
    """Where accepted updates go, as they arrived (``aggregator.checkpoint.StateDir``)."""

    def append(self, topic: str, payload: bytes) -> None: ...


class Holding(Collection[str], Protocol):
    """Where the open version's accepted updates go, by key (``aggregator.combine.Held``)."""

    def add(self, key: str, update: NodeUpdate, scale: float) -> None: ...


H = TypeVar("H", bound=Holding)


class Intake(Generic[H]):
    """The updates accepted on the open model version, and the rejections."""

    def __init__(
        self,
        *,
        topics: Topics,
        layout: Shapes,
        max_update_bytes: int,
        compression: str,  # the SPEC every update must follow
        known_nodes: frozenset[str] | None,  # None: any node id
        policy: VersionPolicy,
        hold: Callable[[], H],  # a new, empty Holding for each version
        journal: Journal | None = None,
        private: bool = False,  # plan.dp_sgd: an update must carry its node's dp_epsilon
    ) -> None:
        self.private = private
        self.topics = topics
        self.layout = layout
        self.max_update_bytes = max_update_bytes
        self.compression = compression
        self.known_nodes = known_nodes
        self.policy = policy
        self.journal = journal
        self._pipeline = parse_spec(compression)
        self._updates_prefix = topics.prefix + "/updates/"  # Topics is frozen
        # By the policy's key: the node id in rounds, ``node@version`` in the buffer.
        self._hold = hold
        self.held = hold()
        self.uplink_bytes = 0  # of the held updates, as received
        self.rejected: Counter[str] = Counter()  # since the last ``take_rejected``

    def start_version(self) -> None:
        """Forget the held updates: a new version is open."""
        self.held = self._hold()
        self.uplink_bytes = 0

    def take_rejected(self) -> dict[str, int]:
        """The rejections counted so far, by reason; counting starts again."""
        rejected, self.rejected = dict(self.rejected), Counter()
        return rejected

    def offer(
        self, topic: str, payload: bytes, current: OpenVersion, *, journal: bool = True
    ) -> bool:
        """Accept the update (held and, if ``journal``, journaled) or reject it: True if
        accepted. ``journal=False`` replays the journal after a restart."""
        node_id = self.topics.node_of(topic)
        if node_id is None or not topic.startswith(self._updates_prefix):
            self._reject("bad_topic", f"not an update topic: {topic!r}", None, current)
            return False
        if len(payload) > self.max_update_bytes:
            detail = f"{len(payload)} bytes, limit {self.max_update_bytes}"
            self._reject("oversized", detail, node_id, current)
            return False
        try:
            update = decode_update(payload, layout=self.layout, max_bytes=self.max_update_bytes)
        except SchemaError as error:
            self._reject(error.reason, error.detail, node_id, current)
            return False
        problem = self.problem(update, node_id, current)
        if problem is not None:
            self._reject(*problem, node_id, current)
            return False
        if journal and self.journal is not None:
            self.journal.append(topic, payload)
        self.held.add(self.policy.key(update, node_id), update, self.policy.scale(update, current))
        self.uplink_bytes += len(payload)
        log.debug("update.accepted", node=node_id, round=current.number, bytes=len(payload))
        return True

    def problem(self, update: NodeUpdate, node: str, current: OpenVersion) -> Problem | None:
        """Why a well-formed update from ``node`` does not go into ``current``, or None."""
        return (
            self._sender_problem(update, node)
            or self.policy.addressed(update, node, current)
            or self._form_problem(update)
            or self.policy.fits(update, node, current, self.held)
        )

    def _sender_problem(self, update: NodeUpdate, node: str) -> Problem | None:
        if update.federation != self.topics.federation:
            return "wrong_federation", f"federation {update.federation!r}"
        if update.node_id != node:
            return "node_id_mismatch", f"payload says {update.node_id!r}, topic says {node!r}"
        if self.known_nodes is not None and node not in self.known_nodes:
            return "unknown_node", f"{node!r} is not in the federation's node list"
        return None

    def _form_problem(self, update: NodeUpdate) -> Problem | None:
        if update.compression != self.compression:
            return (
                "wrong_compression",
                f"compressed as {update.compression!r}, the federation uses {self.compression!r}",
            )
        if self.private and update.dp_epsilon is None:
            return (
                "not_private",
                "no dp_epsilon: the node did not train with the plan's dp_sgd (a node from "
                "before DP-SGD ignores it); upgrade it",
            )
        # A whole delta (decoded as one run) holds every tensor in one form: its first
        # answers for all, as checking each would (found by its method, as in the fold).
        sample = getattr(update.delta, "form_sample", None)
        for name, tensor in [sample()] if sample is not None else update.delta.items():
            problem = self._pipeline.form_problem(tensor)
            if problem is not None:
                return "wrong_encoding", f"delta.{name}: {problem}"
        return None

    def reject(self, reason: str, detail: str, node: str | None, current: OpenVersion) -> None:
        """Count and log an update refused before it was offered (a site's closed round)."""
        self._reject(reason, detail, node, current)

    def _reject(self, reason: str, detail: str, node: str | None, current: OpenVersion) -> None:
        self.rejected[reason] += 1
        log.warning(
            "update.rejected", reason=reason, detail=detail, node=node, round=current.number
        )
