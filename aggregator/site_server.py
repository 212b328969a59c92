"""A site aggregator: its nodes' updates in, one update per root round out, free of MQTT.

The site does not make models. The root's global model reaches the site's broker through
a mosquitto bridge; each one opens a round here (the root's round number and model id).
The site's nodes train on it unchanged and send their updates to the site broker; they
are accepted exactly as a flat aggregator accepts them (``aggregator.intake``: checks,
journal, rejection reasons) and the round closes by the same policy
(``aggregator.rounds.RoundPolicy``: every expected node, or a quorum at the deadline).
Then ``aggregator.site.site_update`` folds them into one update, which is checkpointed
(with the upstream error-feedback residual that goes with it) before it is sent to the
root: a restarted site resends the same update for the open round, and the root keeps
one per site and round. A root model that arrives before the site's round closed opens
the next round; the site's updates of the missed round are dropped (the root closed it
without this site).

Durability is ``aggregator.checkpoint.StateDir``'s, as for the root: a checkpoint when a
round opens (the root's model as received), the journal of the updates accepted on it,
and the checkpoint again, with the site's update, when it is sent.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import msgpack
import numpy as np
import structlog

from fedmq.aggregator.checkpoint import Checkpoint, CheckpointError, metrics_payload, read_history
from fedmq.aggregator.combine import Held
from fedmq.aggregator.intake import Intake
from fedmq.aggregator.policy import OpenVersion
from fedmq.aggregator.publisher import Publish
from fedmq.aggregator.robust import Rule
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.site import SiteRound, site_rng, site_update
from fedmq.compression import Pipeline
from fedmq.compression.transforms import ErrorFeedbackState
from fedmq.schemas import (
    GlobalModel,
    RoundEvaluation,
    RoundMetrics,
    SchemaError,
    Topics,
    decode_global,
    encode,
)
from fedmq.schemas.messages import update_bound
from fedmq.schemas.tensors import Shapes

log = structlog.get_logger()


class Store(Protocol):
    """Where the site makes its state durable (``aggregator.checkpoint.StateDir``)."""

    def save(self, checkpoint: Checkpoint) -> None: ...

    def append(self, topic: str, payload: bytes) -> None: ...


@dataclass(frozen=True)
class SiteSettings:
    federation: str
    site: str  # the site's name: its node id at the root
    policy: RoundPolicy  # when a site round closes (--nodes, --min-nodes, --round-timeout)
    aggregation: Rule  # fedavg, optionally with clip-norm:X (aggregator.site.split_problem)
    upstream: Pipeline  # --upstream-compression
    known_nodes: frozenset[str] | None = None  # --node-ids; None: any node id
    max_update_bytes: int | None = None  # None: the root model's dense bound

    @property
    def fingerprint(self) -> dict[str, str]:
        """What a site's state directory must keep: the federation and the site."""
        return {"federation": self.federation, "site": self.site}


def update_round(payload: bytes) -> int | None:
    """The ``round`` of an update message, read without checking the rest (the intake
    checks everything when it takes the update), or None if it has none."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception:  # msgpack raises many types; any means "not an update to wait with"
        return None
    number = message.get("round") if isinstance(message, dict) else None
    return number if type(number) is int else None


class SiteAggregator:
    def __init__(
        self,
        settings: SiteSettings,
        *,
        publish: Publish,
        send_upstream: Callable[[bytes], None],
        store: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``publish``: on the site broker (metrics); ``send_upstream``: the site's update
        to the root broker (QoS 1)."""
        self.settings = settings
        self.topics = Topics(settings.federation)
        self.store = store
        self._publish = publish
        self._send_upstream = send_upstream
        self._clock = clock
        self._wall = wall_clock
        self._open: OpenVersion | None = None  # the root round open here
        self._model_payload = b""  # the root's model that opened it, as received
        self._layout: Shapes = {}
        self._seed = 0
        self._intake: Intake | None = None
        self._sent: bytes | None = None  # the site's update for the open round, once sent
        self._residual: dict[str, np.ndarray] | None = None  # upstream error feedback
        self.history: list[RoundMetrics] = []
        self._history_wire: list[bytes] = []
        self._started_at = wall_clock()
        self.done = False

    @property
    def round(self) -> int:
        """The root round open here (0 before the root's first model)."""
        return 0 if self._open is None else self._open.number

    @property
    def sent(self) -> bool:
        """The site's update for the open round has been sent."""
        return self._sent is not None

    @property
    def reported(self) -> int:
        return 0 if self._intake is None else len(self._intake.held)

    # ------------------------------------------------------------------ from the root

    def on_global(self, payload: bytes) -> None:
        """The root's global model (bridged to the site broker): a new one opens a round."""
        if not payload:
            return  # the retained model was cleared
        try:
            model = decode_global(payload)
        except SchemaError as error:
            log.error("global.rejected", reason=error.reason, detail=error.detail)
            return
        if model.federation != self.settings.federation:
            return
        if self._open is not None:
            if (model.round, model.model_id) == (self._open.number, self._open.model_id):
                return  # a copy (retained, or the root republished)
            if model.round < self._open.number:
                log.warning("site.old_model", round=model.round, open_round=self._open.number)
                return
        if model.selected is not None:
            log.warning(
                "site.sampled_round",
                round=model.round,
                detail="the root samples nodes (--sample-fraction): a root of sites must not",
            )
        self._open_round(model, payload)

    def _open_round(self, model: GlobalModel, payload: bytes) -> None:
        previous = self._open
        if previous is not None and not previous.final and self.reported:
            log.warning(
                "site.round_missed",
                round=previous.number,
                held=self.reported,
                detail="the root moved on before this site's round closed",
            )
        follows = previous is not None and self.sent and model.round == previous.number + 1
        reporters = frozenset(self._intake.held) if follows and self._intake else frozenset()
        self._start(model, payload, reporters)
        self._sent = None
        if self.store is not None:
            self.store.save(self._checkpoint())
        log.info("site.round_opened", round=model.round, model_id=model.model_id, final=model.final)

    def _start(self, model: GlobalModel, payload: bytes, reporters: frozenset[str]) -> None:
        """Hold ``model`` as the open round's (no checkpoint, nothing published)."""
        layout = {name: tuple(array.shape) for name, array in model.params.items()}
        if (
            self._intake is None
            or layout != self._layout
            or (model.plan.compression != self._intake.compression)
            or (model.plan.dp_sgd is not None) != self._intake.private
        ):
            num_params = sum(int(array.size) for array in model.params.values())
            self._intake = Intake(
                topics=self.topics,
                layout=layout,
                max_update_bytes=self.settings.max_update_bytes or update_bound(num_params),
                compression=model.plan.compression,
                known_nodes=self.settings.known_nodes,
                policy=self.settings.policy,
                hold=lambda: Held(self.settings.aggregation, layout),
                journal=self.store,
                private=model.plan.dp_sgd is not None,
            )
        self._layout = layout
        self._intake.start_version()
        self._seed = model.plan.seed
        self._model_payload = payload
        self.done = model.final
        self._open = OpenVersion(
            number=model.round,
            model_id=model.model_id,
            final=model.final,
            selected=None,
            opened_at=self._clock(),
            previous_reporters=reporters,
        )

    # ------------------------------------------------------------------ from the nodes

    def handle(self, topic: str, payload: bytes) -> bool:
        """One node's update: accepted (journaled) or rejected with a reason, then the
        round closes if the policy says so (``tick``): True. False: the update is for a
        root round whose model has not reached the site yet (a restarted site's broker
        delivers the updates queued for it before the retained model): the edge keeps it
        unacknowledged and hands it in again once a new round opens."""
        if self._open is None or self._open.final:
            number = update_round(payload)
            if number is not None and number > self.round and not self.done:
                return False
        if self._open is None or self._intake is None:
            return False
        node = self.topics.node_of(topic)
        if self.sent and node is not None and update_round(payload) == self.round:
            if node in self._intake.held:  # resent (its PUBACK was lost, or we restarted)
                detail = f"{node} already reported in round {self.round}"
                self._intake.reject("duplicate", detail, node, self._open)
            else:
                detail = f"round {self.round} is closed at this site (its update was sent)"
                self._intake.reject("wrong_round", detail, node, self._open)
            return True
        self._intake.offer(topic, payload, self._open)
        self.tick()
        return True

    def timeout(self) -> float | None:
        """Seconds until ``tick`` might close the round, or None (only a message can)."""
        if self._open is None or self._open.final:
            return None
        return self.settings.policy.seconds_until_check(
            self._open, held=self.reported, now=self._clock()
        )

    def tick(self) -> None:
        if self._open is None or self._open.final or self._intake is None:
            return
        reason = self.settings.policy.close_reason(
            self._open, held=self.reported, now=self._clock()
        )
        if reason is not None:
            self._send(reason)

    def _send(self, closed_by: str) -> None:
        """Fold the held updates into the site's update, checkpoint it with its residual,
        send it to the root and the round's metrics to the site broker."""
        assert self._open is not None and self._intake is not None
        started = self._clock()
        held = self._intake.held
        at = SiteRound(
            federation=self.settings.federation,
            site=self.settings.site,
            round=self._open.number,
            base_model_id=self._open.model_id,
            pipeline=self.settings.upstream,
            seed=self._seed,
        )
        state = None
        kept = self._residual
        if kept is not None and {n: a.shape for n, a in kept.items()} == self._layout:
            state = ErrorFeedbackState(kept)
        rule = self.settings.aggregation
        update, state = site_update(
            at, held, self._layout, rule, site_rng(at), state,
            sent_at=self._wall(),
        )  # fmt: skip
        payload = encode(update)
        made_at = self._wall()
        metrics, metrics_wire = metrics_payload(
            RoundMetrics(
                federation=self.settings.federation,
                round=self._open.number,
                model_id=self._open.model_id,  # the root's model the round trained on
                participants=sorted(held),
                num_examples=update.num_examples,
                accuracy=None,
                loss=None,
                train_loss=update.train_loss,
                uplink_bytes=self._intake.uplink_bytes,
                downlink_bytes=0,  # the root's model reaches the nodes through the bridge
                global_bytes=0,
                rejected=self._intake.take_rejected(),
                seconds=started - self._open.opened_at,
                aggregate_seconds=self._clock() - started,
                closed_by=closed_by,
                at=made_at,
                elapsed=made_at - self._started_at,
                train_seconds_median=statistics.median(u.train_seconds for u in held.values()),
                metrics=RoundEvaluation(central=None, federated=update.metrics),
                extra={  # docs/PROTOCOL.md 8.5; aggregation as a root's: absent if plain
                    "site": self.settings.site,
                    "upstream_bytes": len(payload),
                    "upstream_compression": str(self.settings.upstream),
                    **({} if rule.plain else {"aggregation": str(rule)}),
                },
            )
        )
        self._sent = payload
        self._residual = None if state is None else state.residual
        self.history.append(metrics)
        self._history_wire.append(metrics_wire)
        self._open = replace(self._open, final=True)  # closed here: later updates are late
        if self.store is not None:  # durable before it leaves: a restart resends it
            self.store.save(self._checkpoint())
        self._send_upstream(payload)
        self._publish(self.topics.metrics, metrics_wire, False)
        log.info(
            "site.round_sent",
            round=at.round,
            closed_by=closed_by,
            participants=len(held),
            num_examples=update.num_examples,
            bytes=len(payload),
        )

    # ------------------------------------------------------------------ restarts

    def republish(self) -> None:
        """Send the open round's update again if it was sent (after a reconnect to the
        root or a restart: the root keeps one per site and round), and the last
        metrics (at-least-once)."""
        if self._history_wire:
            self._publish(self.topics.metrics, self._history_wire[-1], False)
        if self._sent is not None:
            self._send_upstream(self._sent)
            log.info("site.update_resent", round=self.round)

    def resume(self, checkpoint: Checkpoint, journal: list[tuple[str, bytes]]) -> None:
        """Carry on from ``checkpoint`` and the journal of its round (call ``republish``
        once connected, and ``tick``)."""
        if checkpoint.fingerprint != self.settings.fingerprint:
            raise CheckpointError(
                f"the state directory holds site {checkpoint.fingerprint.get('site')!r} of "
                f"federation {checkpoint.fingerprint.get('federation')!r}, not "
                f"{self.settings.site!r} of {self.settings.federation!r}: give another "
                "--state-dir, or add --fresh to discard it"
            )
        model = decode_global(checkpoint.global_payload)
        self.history, self._history_wire = read_history(checkpoint.history)
        if checkpoint.started_at is not None:
            self._started_at = checkpoint.started_at
        self._start(model, checkpoint.global_payload, frozenset(checkpoint.previous_reporters))
        self._residual = checkpoint.residual
        self._sent = checkpoint.upstream
        assert self._open is not None and self._intake is not None
        for topic, payload in journal:  # sent or not: whose updates made the round
            self._intake.offer(topic, payload, self._open, journal=False)
        if self._sent is not None:
            self._open = replace(self._open, final=True)
        log.info("site.resumed", round=model.round, replayed=self.reported, sent=self.sent)

    def _checkpoint(self) -> Checkpoint:
        assert self._open is not None
        return Checkpoint(
            version=self._open.number,
            fingerprint=self.settings.fingerprint,
            global_payload=self._model_payload,
            delta_payload=None,
            delta_bytes=None,
            history=self._history_wire,
            previous_reporters=sorted(self._open.previous_reporters),
            started_at=self._started_at,
            upstream=self._sent,
            residual=self._residual,
        )
