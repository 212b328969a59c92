"""The aggregator: updates in, model versions out, free of MQTT.

``Aggregator`` puts the parts together, each in its own module:

- accepting updates (``aggregator.intake``): validate, journal, hold, count rejections;
- when a new model version is made (the settings' version policy, ``aggregator.policy``:
  synchronous rounds, ``aggregator.rounds``, or the asynchronous buffer,
  ``aggregator.buffer``);
- how the held updates become one delta (``aggregator.combine``, under the robust rule of
  ``aggregator.robust``) and how it moves the global model (``aggregator.optimizer``);
- publishing the model, the server status and the metrics (``aggregator.publisher``).

``Aggregator.handle`` takes one received message; ``Aggregator.tick`` makes the next
version when time alone decides it (a round's deadline). Both publish through the ``publish``
callable they were given, so the whole lifecycle is testable without a broker, and the
MQTT edge (``aggregator.app``) stays a thin loop.

Durability goes through the optional ``store`` (``aggregator.checkpoint.StateDir``):
every accepted update is appended to the journal of the version open when it arrived,
and every version is checkpointed before its global model is published, so ``resume`` can
rebuild the exact state after a crash. Under plain FedAvg each accepted update is folded
into the version's running sum at once and its delta dropped (memory flat in the number
of nodes); the other rules hold the updates and combine them in the order of their keys
(node ids in rounds) when the next version is made. Either way the new model does not
depend on the order updates arrived in (``aggregator.combine.Held`` says why, for the
running sum): a crashed-and-resumed run gives bitwise the same model as an uninterrupted
one.
"""

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from fedmq.aggregator.checkpoint import (
    Checkpoint,
    CheckpointError,
    metrics_payload,
    read_history,
)
from fedmq.aggregator.combine import Combined, Held
from fedmq.aggregator.downlink import compress_global, downlink_pipeline, initial_residual
from fedmq.aggregator.dp_fedavg import (
    DpFedAvg,
    delta_noise,
    fleet_delta,
    next_clip,
    private_mean,
    run_epsilon,
    spec_of,
)
from fedmq.aggregator.evaluate import Evaluator, mlp_evaluator
from fedmq.aggregator.federated_metrics import federated_metrics
from fedmq.aggregator.intake import Intake
from fedmq.aggregator.optimizer import (
    ServerOptimizer,
    server_optimizer,
    state_from_leaves,
    state_leaves,
)
from fedmq.aggregator.policy import Opened, OpenVersion, VersionPolicy
from fedmq.aggregator.publisher import Publish, Publisher
from fedmq.aggregator.robust import FEDAVG, Rule, check_memory
from fedmq.aggregator.settings import run_fingerprint
from fedmq.compression import Pipeline
from fedmq.datasets import Dataset
from fedmq.models import MLP
from fedmq.schemas import (
    GlobalModel,
    NodeUpdate,
    RoundEvaluation,
    RoundMetrics,
    ServerStatus,
    Topics,
    TrainingPlan,
    decode_global,
    model_id_of,
)
from fedmq.schemas.messages import finite_metrics, update_bound
from fedmq.schemas.tensors import Params
from fedmq.settings import SAME_AS_DOWNLINK, str_of_dp_sgd
from fedmq.tasks.layout import layout_of

log = structlog.get_logger()

# ``Aggregator._plan_ticks`` looks this far above the held count for one that closes.
_MOST_HELD = 1 << 24


@dataclass(frozen=True)
class RoundSettings:
    federation: str
    model_name: str  # the task's name: ``model`` on the wire
    model: MLP | None  # a built-in task's MLP (numpy evaluation); None for any other task
    rounds: int  # model versions made before the final one (the wire's rounds)
    policy: VersionPolicy  # when a version is made: aggregator.rounds.RoundPolicy
    plan: TrainingPlan  # plan.compression is the SPEC every update must follow
    max_update_bytes: int
    # The fleet's node ids: updates from others are rejected (unknown_node), and rounds
    # sample from them. None: any node id; sampling draws from the nodes present.
    known_nodes: frozenset[str] | None = None
    # How a round's updates become the new model (aggregator.robust). Not part of the
    # fingerprint: like the round policy it is the server's choice, which an operator may
    # change on restart (say to median, once an attack shows); metrics record it per round.
    # Plain FedAvg here; `fedmq aggregator` defaults to robust.DEFAULT (AggregatorSettings).
    aggregation: Rule = FEDAVG
    # The task's declared version (Task.version_text), sent with the layout's fingerprint.
    task_version: str | None = None
    # Parameters of a task that is not a built-in MLP (``model`` None); None: model's.
    model_floats: int | None = None
    # The server update (aggregator.optimizer; --server-optimizer's canonical text). Kept:
    # its state belongs to the run, in the checkpoint; fedavg keeps none.
    server_optimizer: str = "fedavg"
    # The SPEC updates must follow if not the plan's: a root of site aggregators takes
    # the sites' --upstream-compression (docs/hierarchy.md). Not kept, like the rule.
    accepted_compression: str | None = None
    # User-level DP (--dp-fedavg, aggregator.dp_fedavg): clipped, noised, one vote per
    # node. Kept in the fingerprint; only with plain FedAvg in rounds (build checks).
    dp_fedavg: DpFedAvg | None = None
    # --downlink-compression: the SPEC each new model goes to the nodes as (its difference
    # from the previous one; aggregator.downlink), None or "none": the lossless xor form.
    # Not kept, like the rule; its residual (with ef) is in the checkpoint.
    downlink_compression: str | None = None
    # --final-downlink-compression: the SPEC the final model (after the last round) goes
    # as instead, with a larger k: the versions after it that would send what error
    # feedback held back never come. None or "same": downlink_compression's. Not kept.
    final_downlink_compression: str | None = None
    # The seed the initial parameters are the task's initial ones of (fedmq.tasks.initial),
    # if they are: with --downlink-compression, round 1's compact form then carries only
    # this seed (``init_seed``) and nodes build the model. None: not known to be (nodes
    # get round 1 in full). Not kept: it changes no model.
    init_seed: int | None = None
    # --final-delivery-wait: after the final model, the most seconds to wait for the
    # nodes' reports of it (statuses with received_bytes) before the server's ``done``,
    # which then carries what they count (docs/PROTOCOL.md 8.4). 0: no wait, no count,
    # ``done`` at once with the final model. Not kept: it changes no model.
    final_delivery_wait: float = 0.0

    def __post_init__(self) -> None:
        check_memory(
            self.aggregation,
            nodes=self.most_updates_per_round,
            update_bytes=self.max_update_bytes,
            model_floats=self.num_params,
        )

    @property
    def num_params(self) -> int:
        """The model's number of parameters (floats)."""
        if self.model_floats is not None:
            return self.model_floats
        if self.model is None:
            raise ValueError("RoundSettings needs model or model_floats")
        return self.model.num_params

    @property
    def most_updates_per_round(self) -> int:
        """The most updates one version is made from (``VersionPolicy.most_updates``)."""
        return self.policy.most_updates(len(self.known_nodes or ()))

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a run must keep across restarts (rounds and the round policy may change)."""
        return run_fingerprint(
            {
                "federation": self.federation,
                "task": self.model_name,
                **asdict(self.plan),
                # as the options say them (noise=Z,clip=C), None when off
                "dp_sgd": self.plan.dp_sgd and str_of_dp_sgd(self.plan.dp_sgd),
                "dp_fedavg": self.dp_fedavg and spec_of(self.dp_fedavg),
                "server_optimizer": self.server_optimizer,
            }
        )


class Store(Protocol):
    """Where the aggregator makes its state durable (``aggregator.checkpoint.StateDir``)."""

    def save(self, checkpoint: Checkpoint) -> None: ...

    def append(self, topic: str, payload: bytes) -> None: ...


def dense_update_bound(model: MLP | int) -> int:
    """Largest update the aggregator accepts (``schemas.messages.update_bound``) for a
    model, or a number of parameters. Checked before msgpack is even parsed."""
    return update_bound(model if isinstance(model, int) else model.num_params)


def _not_counted() -> int | None:
    return None


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
        broker_dropped: Callable[[], int | None] = _not_counted,
        evaluator: Evaluator | None = None,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        """``broker_dropped``: messages the broker dropped since the last call, None if
        unknown (``aggregator.broker_drops.BrokerDrops.take``); called as each version
        opens and when it is made. The server update is ``settings.server_optimizer``'s,
        unless ``optimizer`` gives another (a part is replaceable: tests, experiments).
        ``evaluator``: each new model's central metrics (``aggregator.evaluate``); by
        default, with ``test``, the built-in MLP's loss and accuracy on it."""
        self.settings = settings
        self.store = store
        self.policy = settings.policy
        # DP-FedAvg's noise: from a secret of this process, never from the plan's seed
        # (a resume draws new noise for a version it makes again: nothing was published)
        self._dp_rng = np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        # the clip the next version uses (adaptive clipping moves it; kept in checkpoints)
        self._dp_clip = None if settings.dp_fedavg is None else settings.dp_fedavg.clip
        if settings.dp_fedavg is not None:  # adaptive: Z must leave noise for the sum
            delta_noise(settings.dp_fedavg, self._dp_expected())
        self.topics = Topics(settings.federation)
        # With a compressed downlink the compact form is retained too: a node that
        # (re)connects gets the newest one and needs the full model only if it cannot
        # rebuild from it (docs/PROTOCOL.md section 3).
        self._out = Publisher(
            self.topics,
            publish,
            clock,
            retain_compact=downlink_pipeline(settings.downlink_compression) is not None,
        )
        if evaluator is None and test is not None:
            if settings.model is None:
                raise ValueError("a test set without an evaluator needs a built-in MLP")
            evaluator = mlp_evaluator(settings.model, test)
        self._evaluator = evaluator
        self._clock = clock
        self._wall = wall_clock
        self._broker_dropped = broker_dropped
        self._optimizer = optimizer or server_optimizer(settings.server_optimizer)
        self.params = initial_params
        self._optimizer_state = self._optimizer.init(initial_params)
        self.layout = {name: tuple(a.shape) for name, a in initial_params.items()}
        self._downlink = downlink_pipeline(settings.downlink_compression)
        self._final_downlink = self._downlink
        if settings.final_downlink_compression not in (None, SAME_AS_DOWNLINK):
            self._final_downlink = downlink_pipeline(settings.final_downlink_compression)
        self._downlink_residual = initial_residual(self._downlink, self.layout)
        # The layout's fingerprint, which nodes check their task against (fedmq.tasks.layout).
        self.task_fingerprint = layout_of(
            settings.model_name, settings.task_version, initial_params
        ).fingerprint
        self.history: list[RoundMetrics] = []
        self._history_wire: list[bytes] = []  # the same, as published (for checkpoints)
        self._present: dict[str, bool] = {}  # node id -> online, from retained status
        # Delivered downlink: each node's last reported received_bytes, and what the
        # reports added up to while the open version was open (None: none reported).
        self._received: dict[str, int] = {}
        self._delivered: int | None = None
        # The final model's delivery (--final-delivery-wait): counted while it is open,
        # from the nodes' reports that they have it (``note_received(final=True)``): who
        # reported, whose count grew from an earlier report of theirs, and the result,
        # (bytes, nodes), once the count is over. ``done`` goes out after it.
        self._counting_final = False
        self._final_heard: set[str] = set()
        self._final_counted: set[str] = set()
        self._final_count: tuple[int | None, int] | None = None
        self._reopen = False  # resumed a finished run whose last model opens another version
        self._started_at = wall_clock()  # when the run started (``elapsed`` in metrics)
        # The versions updates may still be trained on (policy.window), and each node's
        # newest version in a made one: the asynchronous buffer's memory (OpenVersion).
        self._recent: dict[int, Opened] = {}
        self._latest: dict[str, int] = {}
        self._said_overdue = False  # the policy's overdue warning logged for the open version
        # What ``handle`` ticks for: an update that brings the held count to
        # ``_tick_held``, or any message from ``_tick_due`` on (``tick`` works them out;
        # 0 and -inf: tick at the next message).
        self._tick_held, self._tick_due = 0, -math.inf
        self._unbounded: int | None = None  # a version no held count closes (_plan_ticks)
        self._intake = Intake(
            topics=self.topics,
            layout=self.layout,
            max_update_bytes=settings.max_update_bytes,
            compression=settings.accepted_compression or settings.plan.compression,
            known_nodes=settings.known_nodes,
            policy=self.policy,
            hold=lambda: Held(
                settings.aggregation, self.layout, whole=settings.dp_fedavg is not None
            ),
            journal=store,
            private=settings.plan.dp_sgd is not None,
        )
        self._open = OpenVersion(
            number=0,
            model_id=model_id_of(initial_params),
            final=False,
            selected=None,
            opened_at=clock(),
            previous_reporters=frozenset(),
        )
        self._broker_dropped()  # count from here

    # ------------------------------------------------------------------ the open version

    @property
    def version(self) -> int:
        """The open model version, which updates are trained on (0 before ``start``); the
        wire calls it round."""
        return self._open.number

    @property
    def round(self) -> int:
        """``version`` by its name on the wire (the ``round`` field of every message)."""
        return self._open.number

    @property
    def model_id(self) -> str:
        """The open version's global model, which updates are trained on."""
        return self._open.model_id

    @property
    def done(self) -> bool:
        """The final model is out: nothing more is built."""
        return self._open.final

    @property
    def finished(self) -> bool:
        """``done``, and the count of the final model's delivery is over (or none was
        asked for): the server's ``done`` status is out, the process may leave."""
        return self._open.final and not self._counting_final

    @property
    def final_count(self) -> tuple[int | None, int] | None:
        """The final model's delivery once counted: the bytes the nodes reported receiving
        after it was published (None: no node's count), and how many nodes' reports."""
        return self._final_count

    @property
    def held(self) -> Held:
        """The updates accepted for the open version, by the policy's key (node id in
        rounds, ``node@version`` in the asynchronous buffer); under plain FedAvg without
        their deltas, which are in the running sum already (``aggregator.combine.Held``)."""
        return self._intake.held

    @property
    def reported(self) -> int:
        return len(self._intake.held)

    def round_age(self) -> float:
        """Seconds since the open version opened."""
        return self._clock() - self._open.opened_at

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Publish the initial global model, which opens version (round) 1."""
        self._started_at = self._wall()
        self._open_version(1, model_id=self.model_id)

    def resume(self, checkpoint: Checkpoint, journal: list[tuple[str, bytes]]) -> None:
        """Carry on from ``checkpoint`` (the state when its version opened) and the updates
        its journal holds. Publishes nothing: call ``republish`` once connected (and
        ``tick``, in case the journal completed the version). A finished run whose
        ``rounds`` were raised goes on: ``republish`` then opens the next version."""
        model = decode_global(checkpoint.global_payload)
        self.params = {name: np.array(array) for name, array in model.params.items()}
        try:  # the server optimiser's state after the update that made this model
            self._optimizer_state = state_from_leaves(
                self._optimizer, self.params, checkpoint.optimizer_state
            )
        except ValueError as error:
            raise CheckpointError(
                f"unreadable checkpoint: server optimizer state: {error}"
            ) from error
        # A finished run whose rounds were raised since reopens its final model as the
        # next version (``republish``); otherwise it stays finished.
        self._reopen = model.final and model.round <= self.settings.rounds
        self.history, self._history_wire = read_history(checkpoint.history)
        self._out.restore(
            checkpoint.global_payload, checkpoint.delta_payload, checkpoint.delta_bytes
        )
        kept = checkpoint.downlink_residual
        if self._downlink_residual is not None and kept is not None:
            if {name: a.shape for name, a in kept.items()} != dict(self.layout):
                raise CheckpointError("unreadable checkpoint: downlink residual of another layout")
            self._downlink_residual = {name: kept[name] for name in self.layout}
        if checkpoint.started_at is not None:  # else (an older checkpoint): from now
            self._started_at = checkpoint.started_at
        self._recent = dict(checkpoint.recent or {})
        self._recent[model.round] = Opened(model.model_id, model.selected)
        self._latest = dict(checkpoint.latest or {})
        if checkpoint.dp_fedavg_clip is not None:  # adaptive clipping's clip, carried on
            self._dp_clip = checkpoint.dp_fedavg_clip
        # counted by the process that published the final model; a restart republishes it
        self._final_count = checkpoint.final_downlink if model.final and not self._reopen else None
        self._open = OpenVersion(
            number=model.round,
            model_id=model.model_id,
            final=model.final and not self._reopen,
            selected=model.selected,
            opened_at=self._clock(),
            previous_reporters=frozenset(checkpoint.previous_reporters),
            recent=dict(self._recent),
            latest=dict(self._latest),
        )
        self._intake.start_version()
        self._said_overdue = False
        self._tick_held, self._tick_due = 0, -math.inf
        self._broker_dropped()  # count from here
        for topic, payload in journal:
            self._intake.offer(topic, payload, self._open, journal=False)
        log.info(
            "aggregator.resumed",
            round=self.version,
            model_id=self.model_id,
            replayed=self.reported,
            done=self.done,
        )

    def note_presence(self, node_id: str, online: bool) -> None:
        """A node's retained status (its last will says offline): candidates for sampling."""
        self._present[node_id] = online

    def note_received(self, node_id: str, received: int, *, final: bool = False) -> None:
        """A node's count of bytes received on the global topics (its status): what it
        grew by since the node's last report counts in the open version. A node's first
        report (since this process started) is its baseline; a count below the last one
        means the node restarted, and counts in full. ``final``: the status says the node
        is through with the final model (``done``, ``idle`` after a finished run,
        ``error``): while its delivery is counted, that node is no longer waited for."""
        last = self._received.get(node_id)
        self._received[node_id] = received
        if last is not None:
            grown = received - last if received >= last else received
            self._delivered = (self._delivered or 0) + grown
        if final and self._counting_final:
            self._final_heard.add(node_id)
            if last is not None:
                self._final_counted.add(node_id)

    def awaited(self) -> list[str]:
        """While the final model's delivery is counted: the nodes still to report it,
        those present (their status is not ``offline``) whose count the aggregator holds."""
        if not self._counting_final:
            return []
        return sorted(
            node
            for node in self._received
            if self._present.get(node, False) and node not in self._final_heard
        )

    def finish(self) -> None:
        """End the count of the final model's delivery (every node present reported it,
        its wait is over, or the process stops): keep it in the checkpoint, so a restart
        republishes it, and publish the server's ``done`` with it. Nothing if no count
        is under way."""
        if not self._counting_final:
            return
        unreported = self.awaited()
        self._counting_final = False
        self._final_count = (self._delivered, len(self._final_counted))
        log.info(
            "final.delivered",
            round=self.version,
            bytes=self._delivered,
            nodes=len(self._final_counted),
            unreported=unreported,
            seconds=round(self.round_age(), 3),
        )
        if unreported:
            log.warning("final.unreported", nodes=unreported)
        if self.store is not None:
            self.store.save(self._checkpoint())
        self._publish_server_status()

    def republish(self) -> None:
        """Publish the open version's global model and server status again (after a
        reconnect or a restart: the broker or the nodes may have missed them), and the
        last made version's metrics (a crash may have come before they went out:
        metrics are at-least-once, consumers keep one per round)."""
        if self._history_wire:
            self._out.metrics(self._history_wire[-1])
        if self._reopen:  # the run goes on: its final model opens the next version
            self._reopen = False
            log.info("run.continued", round=self.version, rounds=self.settings.rounds)
            self._open_version(
                self.version, model_id=self.model_id, reporters=self._open.previous_reporters
            )
            return
        if self.version >= 1:
            self._out.model()
            if not self._counting_final:  # else ``done`` comes with the count
                self._publish_server_status()

    def timeout(self) -> float | None:
        """Seconds until ``tick`` might make the version (or end the final model's count),
        or None (only a message can)."""
        if self.done:
            if self._counting_final:
                return max(0.0, self.settings.final_delivery_wait - self.round_age())
            return 0.0
        return self.policy.seconds_until_check(self._open, held=self.reported, now=self._clock())

    def tick(self) -> None:
        if self.done:
            waited = self.round_age() >= self.settings.final_delivery_wait
            if self._counting_final and (waited or not self.awaited()):
                self.finish()
            return
        self._tick(self._clock())

    def _tick(self, now: float) -> int | None:
        """``tick`` at ``now``: the held count if the version stays open, else None."""
        held = self.reported
        reason = self.policy.close_reason(self._open, held=held, now=now)
        if reason is not None:
            self._make_version(reason)
            return None
        if not self._said_overdue:  # late and still short: say so, once
            overdue = self.policy.overdue(self._open, held=held, now=now)
            if overdue is not None:
                self._said_overdue = True
                event, fields = overdue
                log.warning(event, **fields)
        return held

    def _plan_ticks(self, held: int, now: float) -> None:
        """When ``handle`` must tick next: the policy's answer depends on the held count
        (more can only close: ``held >=`` in every policy) and on time, which cannot
        change it before ``seconds_until_check`` (nor make the version overdue: both
        follow the same deadline; a tick from elsewhere, the MQTT edge's when idle, changes
        neither). So until then the next tick that can make the version
        is the one after the update that brings the count to the fewest that closes it
        now, found by asking the policy (doubling, then halving); a tick after any other
        update would find nothing to do."""

        def closes(count: int) -> bool:
            return self.policy.close_reason(self._open, held=count, now=now) is not None

        wait = self.policy.seconds_until_check(self._open, held=held, now=now)
        # one float below now + wait: never later than the time it stands for
        self._tick_due = math.inf if wait is None else math.nextafter(now + wait, -math.inf)
        if self._unbounded == self._open.number:  # searched this version in vain already
            self._tick_held = held + 1
            return
        low, step = held, 1  # low: does not close
        while not closes(low + step):
            low += step
            step *= 2
            if step > _MOST_HELD:  # no count closes it (none of today's policies): a tick
                # after every update, as before, for the rest of the version (the ~24
                # questions of this search are not asked again at each)
                self._unbounded = self._open.number
                self._tick_held = held + 1
                return
        high = low + step  # closes
        while high - low > 1:
            middle = (low + high) // 2
            if closes(middle):
                high = middle
            else:
                low = middle
        self._tick_held = high

    def handle(self, topic: str, payload: bytes) -> None:
        """Validate one update; accept it (journaled) or reject it with a reason; then make
        the next version if the policy says so (``tick``). It ticks after the updates
        that may close the version and once time may (``_plan_ticks``): the same
        versions, from the same updates, as a tick after every message."""
        self.ingest(topic, payload)
        now = self._clock()
        if (self.reported >= self._tick_held or now >= self._tick_due) and not self.done:
            held = self._tick(now)
            if held is not None:
                self._plan_ticks(held, now)

    def ingest(self, topic: str, payload: bytes) -> None:
        """``handle`` without the ``tick``: the MQTT edge of asynchronous mode ingests a
        whole batch of received messages, then ticks once, so a version takes every
        update that arrived with its K-th (aggregator.buffer: the backpressure)."""
        self._intake.offer(topic, payload, self._open)
        if not self.done and self._out.status_due():
            self._publish_server_status()  # progress toward the quorum, for monitors

    def server_status(self, state: str | None = None) -> ServerStatus:
        progress = self.policy.progress(self._open)
        state = state or ("done" if self.done else "waiting")
        counted = self._final_count if state == "done" else None
        delivered, nodes = counted or (None, None)
        return ServerStatus(
            federation=self.settings.federation,
            state=state,
            round=self.version,
            expected_nodes=progress.expected_nodes,
            min_nodes=progress.min_nodes,
            reported=self.reported,
            deadline_seconds=progress.deadline_seconds,
            at=self._wall(),
            final_downlink_delivered=delivered,
            final_downlink_nodes=nodes,
        )

    # ------------------------------------------------------------------ internals

    def _open_version(
        self,
        number: int,
        *,
        model_id: str,
        previous: tuple[Params, str] | None = None,
        reporters: frozenset[str] | None = None,
        compressed: tuple[str, Any] | None = None,
    ) -> None:
        """Checkpoint and publish the global model ``model_id`` (``self.params``) that
        opens version ``number``. ``previous``: the model before (params, id), for the
        compact form; ``reporters``: the previous version's, if not the ones just held;
        ``compressed``: the SPEC and the compressed delta from ``previous`` as it travels
        (with --downlink-compression), for the compact form instead of the xor one."""
        final = number > self.settings.rounds
        selected = None
        if not final:
            known = self.settings.known_nodes
            candidates = known if known is not None else self._online()
            selected = self.policy.select(candidates, seed=self.settings.plan.seed, version=number)
        message = GlobalModel(
            federation=self.settings.federation,
            round=number,
            model=self.settings.model_name,
            model_id=model_id,
            params=self.params,
            plan=self.settings.plan,
            final=final,
            created_at=self._wall(),
            selected=selected,
            task_version=self.settings.task_version,
            task_fingerprint=self.task_fingerprint,
        )
        seed = None
        if self._downlink is not None and previous is None and number == 1:
            seed = self.settings.init_seed  # the run's initial model: nodes build it
        self._out.prepare_model(
            message, previous, compressed=compressed or (None, None), init_seed=seed
        )
        self._recent[number] = Opened(model_id, selected)
        for old in [v for v in self._recent if v < number - self.policy.window]:
            del self._recent[old]
        self._open = OpenVersion(
            number=number,
            model_id=model_id,
            final=final,
            selected=selected,
            opened_at=self._clock(),
            previous_reporters=frozenset(self._intake.held) if reporters is None else reporters,
            recent=dict(self._recent),
            latest=dict(self._latest),
        )
        self._intake.start_version()
        self._said_overdue = False
        self._tick_held, self._tick_due = 0, -math.inf
        self._broker_dropped()  # count from here
        self._delivered = None
        # the final model's delivery is counted before ``done`` goes out (finish)
        self._counting_final = final and self.settings.final_delivery_wait > 0
        self._final_heard, self._final_counted, self._final_count = set(), set(), None
        if self.store is not None:  # durable before anyone can train on it
            self.store.save(self._checkpoint())
        self._out.model()
        if not self._counting_final:
            self._publish_server_status()
        log.info(
            "round.opened",
            round=number,
            model_id=model_id,
            final=final,
            bytes=self._out.global_bytes,
        )

    def _online(self) -> list[str]:
        return [node for node, online in self._present.items() if online]

    def _checkpoint(self) -> Checkpoint:
        remembers = self.policy.window > 0  # the asynchronous buffer's memory
        return Checkpoint(
            version=self.version,
            fingerprint=self.settings.fingerprint,
            global_payload=self._out.global_payload,
            delta_payload=self._out.delta_payload,
            delta_bytes=self._out.delta_bytes,
            history=self._history_wire,
            previous_reporters=sorted(self._open.previous_reporters),
            optimizer_state=state_leaves(self._optimizer_state),
            started_at=self._started_at,
            recent=dict(self._recent) if remembers else None,
            latest=dict(self._latest) if remembers else None,
            downlink_residual=self._downlink_residual,
            dp_fedavg_clip=self._dp_clip
            if self.settings.dp_fedavg is not None and self.settings.dp_fedavg.adaptive
            else None,
            final_downlink=self._final_count,
        )

    def _publish_server_status(self) -> None:
        self._out.status(self.server_status())

    def _dp_expected(self) -> int:
        """Adaptive clipping's m: the participants a round expects, ceil(fraction x nodes),
        for the whole run (the count's noise does not follow who was online to sample)."""
        nodes = getattr(self.policy, "expected_nodes", 1)
        return max(1, math.ceil(getattr(self.policy, "sample_fraction", 1.0) * nodes))

    def _private(self, held: Mapping[str, NodeUpdate]) -> Combined:
        """DP-FedAvg's mean delta of the held updates (``aggregator.dp_fedavg``), the
        participants' plain mean training loss, and the run's epsilon so far; adaptive
        clipping also moves the clip for the next version."""
        dp = self.settings.dp_fedavg
        assert dp is not None and self._dp_clip is not None
        selected = self._open.selected
        expected = len(selected) if selected else getattr(self.policy, "expected_nodes", 1)
        m = self._dp_expected()
        clip = self._dp_clip
        mean, clipped, unclipped = private_mean(
            held, self.layout, dp, expected, self._dp_rng, clip=clip,
            multiplier=delta_noise(dp, m),
        )  # fmt: skip
        if dp.adaptive:
            self._dp_clip = next_clip(clip, unclipped, len(held), m, self._dp_rng)
        fleet = len(self.settings.known_nodes or ()) or getattr(self.policy, "expected_nodes", 1)
        delta = fleet_delta(fleet)
        extra = {
            "dp_fedavg_epsilon": run_epsilon(dp, self.version, delta),
            "dp_fedavg_delta": delta,
            "dp_fedavg_clipped": clipped,
            "dp_fedavg_clip": clip,
        }
        loss = statistics.fmean(update.train_loss for update in held.values())
        return Combined(mean, loss, extra)

    def _downlink_for(self, number: int) -> Pipeline:
        """The downlink's pipeline for the model opening version ``number``: the final
        model's (--final-downlink-compression) after the last round, else the usual."""
        pipeline = self._final_downlink if number > self.settings.rounds else self._downlink
        assert pipeline is not None
        return pipeline

    def _make_version(self, closed_by: str) -> None:
        """Combine the held updates, apply the server update, record and publish the
        metrics, and open the next version on the new model."""
        started = self._clock()
        held = self._intake.held
        combined = held.combine() if self.settings.dp_fedavg is None else self._private(held)
        previous = (self.params, self.model_id)
        target, self._optimizer_state = self._optimizer.update(
            self.params, combined.delta, self._optimizer_state
        )
        compressed = None
        if self._downlink is None:
            self.params = target
        else:  # the new model is what the nodes rebuild from the compressed delta
            pipeline = self._downlink_for(self.version + 1)
            downlink = compress_global(
                pipeline,
                previous[0],
                target,
                self._downlink_residual,
                seed=self.settings.plan.seed,
                version=self.version + 1,
            )
            self.params, self._downlink_residual = downlink.params, downlink.residual
            compressed = (str(pipeline), downlink.wire)
        model_id = model_id_of(self.params)
        central = self._evaluator(self.params) if self._evaluator is not None else {}
        loss, accuracy = central.get("loss"), central.get("accuracy")
        participants = sorted({update.node_id for update in held.values()})
        for update in held.values():  # a node's older updates are resent copies from now
            self._latest[update.node_id] = max(update.round, self._latest.get(update.node_id, 0))
        rejected = self._intake.take_rejected()
        made_at = self._wall()
        extra = dict(combined.extra)
        if self.policy.window > 0:
            staleness = [self.version - update.round for update in held.values()]
            extra |= {
                "staleness_max": max(staleness),
                "staleness_mean": statistics.fmean(staleness),
            }
        spent = [u.dp_epsilon for u in held.values() if u.dp_epsilon is not None]
        if spent:  # DP-SGD: the most any participant has spent (docs/PROTOCOL.md 8.5)
            extra |= {"dp_epsilon_max": max(spent)}
        out = self._out
        metrics = RoundMetrics(
            federation=self.settings.federation,
            round=self.version,
            model_id=model_id,
            participants=participants,
            num_examples=sum(update.num_examples for update in held.values()),
            accuracy=accuracy,
            loss=loss,
            # DP-SGD nodes send no training loss (it is not private): none to average;
            # under DP-FedAvg the mean of the nodes' losses would leak past the noise
            train_loss=None
            if self.settings.plan.dp_sgd or self.settings.dp_fedavg
            else combined.train_loss,
            uplink_bytes=self._intake.uplink_bytes,
            # what the participants needed: the compact form if there was one
            downlink_bytes=(out.delta_bytes or out.global_bytes) * len(participants),
            global_bytes=out.global_bytes,
            global_delta_bytes=out.delta_bytes,
            rejected=rejected,
            seconds=started - self._open.opened_at,
            aggregate_seconds=self._clock() - started,
            closed_by=closed_by,
            at=made_at,
            elapsed=made_at - self._started_at,
            downlink_delivered=self._delivered,
            extra=extra,
            train_seconds_median=statistics.median(
                update.train_seconds for update in held.values()
            ),
            broker_dropped=self._broker_dropped(),
            metrics=RoundEvaluation(
                central=None if self._evaluator is None else finite_metrics(central),
                federated=federated_metrics(held),
            ),
        )
        metrics, payload = metrics_payload(metrics)  # a diverged model's loss: nil
        self.history.append(metrics)
        self._history_wire.append(payload)
        log.info(
            "round.closed",
            **extra,
            round=self.version,
            closed_by=closed_by,
            participants=len(participants),
            accuracy=metrics.accuracy,
            loss=metrics.loss,
            federated=metrics.metrics.federated if metrics.metrics else None,
            rejected=rejected,
            seconds=round(metrics.seconds, 4),
        )
        out.metrics(payload)
        self._open_version(
            self.version + 1, model_id=model_id, previous=previous, compressed=compressed
        )
