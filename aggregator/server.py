"""The aggregator's round state machine, free of MQTT: messages in, publications out.

``Aggregator.handle`` takes one received message; ``Aggregator.tick`` closes a round whose
deadline has passed. Both publish through the ``publish`` callable they were given, so the
whole lifecycle is testable without a broker, and the MQTT edge (``aggregator.app``)
stays a thin loop.

Durability goes through the optional ``store`` (``aggregator.checkpoint.StateDir``):
every accepted update is appended to the open round's journal, and every round opened is
checkpointed before its global model is published, so ``resume`` can rebuild the exact
state after a crash. Accepted updates are summed when the round closes, in node-id order,
so the new model does not depend on the order updates arrived in: a crashed-and-resumed
run gives bitwise the same model as an uninterrupted one.
"""

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from fedmq.aggregator.checkpoint import Checkpoint, metrics_payload, read_history
from fedmq.aggregator.evaluate import evaluate
from fedmq.aggregator.fedavg import WeightedSum, apply_mean_delta
from fedmq.aggregator.robust import FEDAVG, Rule, aggregate, check_memory
from fedmq.aggregator.rounds import (
    RoundPolicy,
    close_reason,
    quorum,
    seconds_until_check,
    select_nodes,
)
from fedmq.compression import Pipeline, parse_spec
from fedmq.datasets import Dataset
from fedmq.models import MLP
from fedmq.schemas import (
    GlobalModel,
    NodeUpdate,
    RoundMetrics,
    SchemaError,
    ServerStatus,
    Topics,
    TrainingPlan,
    decode_global,
    decode_update,
    encode,
    make_global_delta,
    model_id_of,
)
from fedmq.schemas.messages import update_bound
from fedmq.schemas.tensors import Params

log = structlog.get_logger()


Publish = Callable[[str, bytes, bool], None]  # (topic, payload, retain), QoS 1
# Least time between two server status messages sent because updates arrived.
STATUS_INTERVAL = 0.25


@dataclass(frozen=True)
class RoundSettings:
    federation: str
    model_name: str
    model: MLP
    rounds: int
    policy: RoundPolicy
    plan: TrainingPlan  # plan.compression is the SPEC every update must follow
    max_update_bytes: int
    # The fleet's node ids: updates from others are rejected (unknown_node), and rounds
    # sample from them. None: any node id; sampling draws from the nodes present.
    known_nodes: frozenset[str] | None = None
    # How a round's updates become the new model (aggregator.robust). Not part of the
    # fingerprint: like the round policy it is the server's choice, which an operator may
    # change on restart (say to median, once an attack shows); metrics record it per round.
    # Plain FedAvg here; `fedmq aggregator` defaults to robust.DEFAULT (AggregatorConfig).
    aggregation: Rule = FEDAVG

    def __post_init__(self) -> None:
        check_memory(
            self.aggregation,
            nodes=self.most_updates_per_round,
            update_bytes=self.max_update_bytes,
            model_floats=self.model.num_params,
        )

    @property
    def most_updates_per_round(self) -> int:
        """A round closes as soon as its expected nodes, or the nodes sampled from the
        fleet (``select_nodes``' count), have reported. Sampling without a node list
        draws from the nodes online, unknown here: expected_nodes stands in for them."""
        policy, fleet = self.policy, len(self.known_nodes or ())
        if policy.sample_fraction < 1 and fleet:
            return min(fleet, max(1, math.ceil(policy.sample_fraction * fleet)))
        return policy.expected_nodes

    @property
    def pipeline(self) -> Pipeline:
        return parse_spec(self.plan.compression)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a run must keep across restarts (rounds and the round policy may change)."""
        plan = self.plan
        return {
            "federation": self.federation,
            "model": self.model_name,
            "plan": [plan.learning_rate, plan.batch_size, plan.local_epochs, plan.seed],
            "compression": plan.compression,
        }


class Store(Protocol):
    """Where the aggregator makes its state durable (``aggregator.checkpoint.StateDir``)."""

    def save(self, checkpoint: Checkpoint) -> None: ...

    def append(self, topic: str, payload: bytes) -> None: ...


def dense_update_bound(model: MLP) -> int:
    """Largest update the aggregator accepts (``schemas.messages.update_bound``).
    Checked before msgpack is even parsed."""
    return update_bound(model.num_params)


class Aggregator:
    def __init__(
        self,
        settings: RoundSettings,
        initial_params: dict[str, np.ndarray],
        *,
        publish: Publish,
        test: Dataset | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._pipeline = settings.pipeline
        self.topics = Topics(settings.federation)
        self._publish = publish
        self._test = test
        self._clock = clock
        self._wall = wall_clock
        self.params = initial_params
        self.layout = {name: tuple(a.shape) for name, a in initial_params.items()}
        self.round = 0
        self.model_id = model_id_of(initial_params)
        self.done = False
        self.history: list[RoundMetrics] = []
        self._history_wire: list[bytes] = []  # the same, as published (for checkpoints)
        self._rejected: Counter[str] = Counter()  # of the open round; reset when it closes
        self._global_bytes = 0
        self._global_payload = b""
        self._delta_payload: bytes | None = None
        self._status_published_at = float("-inf")
        self._delta_bytes: int | None = None
        self._dropped_reading: int | None = None  # latest $SYS dropped counter seen
        self._dropped_in_round: int | None = None  # None until the broker told us
        self._dropped_still = False  # no reading, but the counter has not moved for 60 s
        self._accepted: dict[str, NodeUpdate] = {}
        self._present: dict[str, bool] = {}  # node id -> online, from retained status
        self._selected: tuple[str, ...] | None = None  # of the open round
        self._reopen = False  # resumed a finished run whose last model opens another round
        self._said_short = False  # round.short_of_quorum logged for the open round
        self._reset_round()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Publish the initial global model, which opens round 1."""
        self._open_round(1)

    def resume(self, checkpoint: Checkpoint, journal: list[tuple[str, bytes]]) -> None:
        """Carry on from ``checkpoint`` (the state when its round opened) and the updates
        that round's journal holds. Publishes nothing: call ``republish`` once connected
        (and ``tick``, in case the journal completed the round). A finished run whose
        ``rounds`` were raised goes on: ``republish`` then opens the next round."""
        model = decode_global(checkpoint.global_payload)
        self.params = {name: np.array(array) for name, array in model.params.items()}
        self.model_id = model.model_id
        self.round = model.round
        # A finished run whose rounds were raised since reopens its final model as the
        # next round (``republish``); otherwise it stays finished.
        self._reopen = model.final and model.round <= self.settings.rounds
        self.done = model.final and not self._reopen
        self.history, self._history_wire = read_history(checkpoint.history)
        self._global_payload = checkpoint.global_payload
        self._global_bytes = len(checkpoint.global_payload)
        self._delta_payload = checkpoint.delta_payload
        self._delta_bytes = checkpoint.delta_bytes
        self._selected = model.selected
        self._reset_round()
        self._previous_reporters = frozenset(checkpoint.previous_reporters)
        for topic, payload in journal:
            self._ingest(topic, payload, journal=False)
        log.info(
            "aggregator.resumed",
            round=self.round,
            model_id=self.model_id,
            replayed=len(self._accepted),
            done=self.done,
        )

    def note_presence(self, node_id: str, online: bool) -> None:
        """A node's retained status (its last will says offline): candidates for sampling."""
        self._present[node_id] = online

    def note_broker_dropped(self, count: int) -> None:
        """The broker's ``$SYS/.../messages/dropped`` counter, read whenever it is published.

        The counter starts again from 0 when the broker restarts: a reading below the
        last one counts in full. The first reading after ``note_broker_dropped_unchanged``
        is a change from a value we never saw: it counts as 1 (at least one dropped)."""
        last, self._dropped_reading = self._dropped_reading, count
        if last is None:  # first reading: count from here
            self._dropped_in_round = (self._dropped_in_round or 0) + int(self._dropped_still)
            self._dropped_still = False
            return
        self._dropped_in_round = (self._dropped_in_round or 0) + (
            count - last if count >= last else count
        )

    def note_broker_dropped_unchanged(self) -> None:
        """The broker publishes $SYS, yet sent no dropped counter with our subscription.

        mosquitto publishes the counter retained with a 60 s expiry, and only when it
        changes (schemas.sys_topics): it has not changed for a minute, so nothing was
        dropped since and the rounds count 0 from here. A no-op once a reading is known."""
        if self._dropped_reading is None:
            self._dropped_still = True
            self._dropped_in_round = self._dropped_in_round or 0

    def republish(self) -> None:
        """Publish the open round's global model and server status again (after a
        reconnect or a restart: the broker or the nodes may have missed them), and the
        last closed round's metrics (a crash may have come before they went out:
        metrics are at-least-once, consumers keep one per round)."""
        if self._history_wire:
            self._publish(self.topics.metrics, self._history_wire[-1], False)
        if self._reopen:  # the run goes on: its final model opens the next round
            self._reopen = False
            log.info("run.continued", round=self.round, rounds=self.settings.rounds)
            self._open_round(self.round, reporters=self._previous_reporters)
            return
        if self.round >= 1:
            if self._delta_payload is not None:  # nodes following compact forms see this
                self._publish(self.topics.global_delta, self._delta_payload, False)
            self._publish(self.topics.global_model, self._global_payload, True)
            self._publish_server_status()

    def timeout(self) -> float | None:
        """Seconds until ``tick`` might close the open round, or None (only a message can)."""
        if self.done:
            return 0.0
        return seconds_until_check(
            self.settings.policy,
            opened_at=self._opened_at,
            now=self._clock(),
            reported=self.reported,
            selected=None if self._selected is None else len(self._selected),
        )

    def tick(self) -> None:
        if self.done:
            return
        policy, selected = self.settings.policy, self._selected
        sampled = None if selected is None else len(selected)
        now = self._clock()
        reason = close_reason(
            policy, reported=self.reported, opened_at=self._opened_at, now=now, selected=sampled
        )
        if reason is not None:
            self._close_round(reason)
        elif (
            not self._said_short
            and policy.deadline_seconds is not None
            and now - self._opened_at >= policy.deadline_seconds
        ):  # the round stays open until the quorum is reached: say so, once
            self._said_short = True
            log.warning(
                "round.short_of_quorum",
                round=self.round,
                reported=self.reported,
                min_nodes=quorum(policy, sampled),
                deadline_seconds=policy.deadline_seconds,
            )

    def handle(self, topic: str, payload: bytes) -> None:
        """Validate one update; accept it (journaled) or reject it with a reason."""
        self._ingest(topic, payload, journal=True)
        self.tick()
        if not self.done and self._clock() - self._status_published_at >= STATUS_INTERVAL:
            self._publish_server_status()  # progress toward the quorum, for monitors

    @property
    def reported(self) -> int:
        return len(self._accepted)

    def round_age(self) -> float:
        """Seconds since the open round opened."""
        return self._clock() - self._opened_at

    # ------------------------------------------------------------------ internals

    def _ingest(self, topic: str, payload: bytes, *, journal: bool) -> None:
        node_id = self.topics.node_of(topic)
        if node_id is None or not topic.startswith(self.topics.prefix + "/updates/"):
            self._reject("bad_topic", f"not an update topic: {topic!r}", node_id=None)
            return
        if len(payload) > self.settings.max_update_bytes:
            self._reject(
                "oversized",
                f"{len(payload)} bytes, limit {self.settings.max_update_bytes}",
                node_id=node_id,
            )
            return
        try:
            update = decode_update(
                payload, layout=self.layout, max_bytes=self.settings.max_update_bytes
            )
        except SchemaError as error:
            self._reject(error.reason, error.detail, node_id=node_id)
            return
        problem = self._check_context(update, topic_node=node_id)
        if problem is not None:
            self._reject(*problem, node_id=node_id)
            return
        if journal and self._store is not None:
            self._store.append(topic, payload)
        self._accepted[node_id] = update
        self._uplink_bytes += len(payload)
        log.debug("update.accepted", node=node_id, round=self.round, bytes=len(payload))

    def _check_context(self, update: NodeUpdate, *, topic_node: str) -> tuple[str, str] | None:
        """Why a well-formed update does not belong in the open round, or None."""
        if update.federation != self.settings.federation:
            return "wrong_federation", f"federation {update.federation!r}"
        if update.node_id != topic_node:
            return "node_id_mismatch", f"payload says {update.node_id!r}, topic says {topic_node!r}"
        known = self.settings.known_nodes
        if known is not None and topic_node not in known:
            return "unknown_node", f"{topic_node!r} is not in the federation's node list"
        if update.round == self.round - 1 and topic_node in self._previous_reporters:
            # a resent copy (after a reconnect) of an update the last round already has
            return "duplicate", f"{topic_node} already reported in round {update.round}"
        if self.done or update.round != self.round:
            return "wrong_round", f"update for round {update.round}, open round is {self.round}"
        if self._selected is not None and topic_node not in self._selected:
            return "not_selected", f"{topic_node} was not sampled for round {self.round}"
        if update.compression != self.settings.plan.compression:
            return (
                "wrong_compression",
                f"compressed as {update.compression!r}, the federation uses "
                f"{self.settings.plan.compression!r}",
            )
        pipeline = self._pipeline
        for name, tensor in update.delta.items():
            problem = pipeline.form_problem(tensor)
            if problem is not None:
                return "wrong_encoding", f"delta.{name}: {problem}"
        if update.base_model_id != self.model_id:
            return (
                "wrong_base_model",
                f"trained from {update.base_model_id}, open model is {self.model_id}",
            )
        if topic_node in self._accepted:
            return "duplicate", f"{topic_node} already reported in round {self.round}"
        return None

    def _reject(self, reason: str, detail: str, *, node_id: str | None) -> None:
        self._rejected[reason] += 1
        log.warning("update.rejected", reason=reason, detail=detail, node=node_id, round=self.round)

    def _reset_round(self, reporters: frozenset[str] | None = None) -> None:
        # Held until the round closes (memory: the open round's updates as decoded, about
        # their wire size), then summed in node-id order: see the module docstring.
        self._previous_reporters = frozenset(self._accepted) if reporters is None else reporters
        self._accepted = {}
        self._uplink_bytes = 0
        self._opened_at = self._clock()
        self._said_short = False
        known = self._dropped_reading is not None or self._dropped_still
        self._dropped_in_round = 0 if known else None

    def _open_round(
        self,
        round: int,
        previous: tuple[Params, str] | None = None,
        *,
        reporters: frozenset[str] | None = None,
    ) -> None:
        """Publish the global model opening ``round`` (retained, in full) and, when the
        previous one is known, its compact XOR form for nodes that hold that one.
        ``reporters``: the previous round's participants, if not the ones just held."""
        final = round > self.settings.rounds
        policy = self.settings.policy
        self._selected = None
        if not final and policy.sample_fraction < 1:
            known = self.settings.known_nodes
            candidates = known if known is not None else self._online()
            self._selected = select_nodes(
                candidates,
                fraction=policy.sample_fraction,
                seed=self.settings.plan.seed,
                round=round,
            )
        message = GlobalModel(
            federation=self.settings.federation,
            round=round,
            model=self.settings.model_name,
            model_id=self.model_id,
            params=self.params,
            plan=self.settings.plan,
            final=final,
            created_at=self._wall(),
            selected=self._selected,
        )
        payload = encode(message)
        self.round = round
        self._global_bytes = len(payload)
        self._global_payload = payload
        self._delta_bytes = None
        self._reset_round(reporters)
        self.done = final
        if previous is not None:
            compact = encode(make_global_delta(previous[0], message, previous[1]))
            self._delta_bytes = len(compact)
        else:  # nothing to XOR against: nodes following compact forms get it whole
            compact = payload
        self._delta_payload = compact
        if self._store is not None:  # durable before anyone can train on it
            self._store.save(self._checkpoint())
        self._publish(self.topics.global_delta, compact, False)
        self._publish(self.topics.global_model, payload, True)
        self._publish_server_status()
        log.info(
            "round.opened", round=round, model_id=self.model_id, final=final, bytes=len(payload)
        )

    def _online(self) -> list[str]:
        return [node for node, online in self._present.items() if online]

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(
            round=self.round,
            fingerprint=self.settings.fingerprint,
            global_payload=self._global_payload,
            delta_payload=self._delta_payload,
            delta_bytes=self._delta_bytes,
            history=self._history_wire,
            previous_reporters=sorted(self._previous_reporters),
        )

    def server_status(self, state: str | None = None) -> ServerStatus:
        policy = self.settings.policy
        expected = policy.expected_nodes if self._selected is None else len(self._selected)
        return ServerStatus(
            federation=self.settings.federation,
            state=state or ("done" if self.done else "waiting"),
            round=self.round,
            expected_nodes=expected,
            min_nodes=min(self.settings.policy.min_nodes, expected),
            reported=self.reported,
            deadline_seconds=self.settings.policy.deadline_seconds,
            at=self._wall(),
        )

    def _publish_server_status(self) -> None:
        self._status_published_at = self._clock()
        status = self.server_status()
        self._publish(self.topics.server, encode(status), True)

    def sum_accepted(self) -> tuple[WeightedSum, float]:
        """The open round's example-weighted sums (deltas, training loss), in node-id
        order: a fixed order, see the module docstring. Plain FedAvg's round close."""
        total = WeightedSum(self.layout)
        train_loss_sum = 0.0
        for node_id in sorted(self._accepted):
            update = self._accepted[node_id]
            total.add(update.delta, update.num_examples)
            train_loss_sum += update.train_loss * update.num_examples
        return total, train_loss_sum

    def _aggregate(self) -> tuple[Params, float, dict[str, Any]]:
        """The round's mean delta under the configured rule, the participants' mean
        training loss (weighted as their deltas were) and what the metrics add.

        Plain FedAvg is the running sum's mean, exactly as before; the other rules read
        the held updates in node-id order."""
        rule = self.settings.aggregation
        if rule.plain:
            total, train_loss_sum = self.sum_accepted()
            return total.mean(), train_loss_sum / total.total_weight, {}
        updates = [self._accepted[node_id] for node_id in sorted(self._accepted)]
        outcome = aggregate(rule, [(u.delta, u.num_examples) for u in updates], self.layout)
        train_loss_sum = 0.0
        for update, weight in zip(updates, outcome.weights, strict=True):
            train_loss_sum += update.train_loss * weight
        return outcome.delta, train_loss_sum / sum(outcome.weights), outcome.metrics(rule)

    def _close_round(self, closed_by: str) -> None:
        started = self._clock()
        mean_delta, train_loss, extra = self._aggregate()
        previous = (self.params, self.model_id)
        self.params = apply_mean_delta(self.params, mean_delta)
        self.model_id = model_id_of(self.params)
        loss = accuracy = None
        if self._test is not None:
            loss, accuracy = evaluate(self.settings.model, self.params, self._test)
        participants = sorted(self._accepted)
        metrics = RoundMetrics(
            federation=self.settings.federation,
            round=self.round,
            model_id=self.model_id,
            participants=participants,
            num_examples=sum(update.num_examples for update in self._accepted.values()),
            accuracy=accuracy,
            loss=loss,
            train_loss=train_loss,
            uplink_bytes=self._uplink_bytes,
            # what the participants needed: the compact form if there was one
            downlink_bytes=(self._delta_bytes or self._global_bytes) * len(participants),
            global_bytes=self._global_bytes,
            global_delta_bytes=self._delta_bytes,
            rejected=dict(self._rejected),
            seconds=started - self._opened_at,
            aggregate_seconds=self._clock() - started,
            closed_by=closed_by,
            at=self._wall(),
            extra=extra,
            train_seconds_median=statistics.median(
                update.train_seconds for update in self._accepted.values()
            ),
            broker_dropped=self._dropped_in_round,
        )
        metrics, payload = metrics_payload(metrics)  # a diverged model's loss: nil
        self.history.append(metrics)
        self._history_wire.append(payload)
        log.info(
            "round.closed",
            **extra,
            round=self.round,
            closed_by=closed_by,
            participants=len(participants),
            accuracy=metrics.accuracy,
            loss=metrics.loss,
            rejected=dict(self._rejected),
            seconds=round(metrics.seconds, 4),
        )
        self._rejected = Counter()
        self._publish(self.topics.metrics, payload, False)
        self._open_round(self.round + 1, previous)
