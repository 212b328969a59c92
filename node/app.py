"""The node process: receive the retained global model, train locally, publish the delta.

Only this module touches MQTT, files and clocks for a node; the maths is in
``fedmq.tasks`` (``training.train_local`` on the node's task). Training runs on the main
thread, never in a paho callback.
"""

import math
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fedmq import mqtt as edge
from fedmq.compression import Pipeline, parse_spec
from fedmq.compression.transforms import ErrorFeedbackState, error_feedback_init
from fedmq.datasets import Dataset, digits, load_npz, partition
from fedmq.files import DirectoryLock, lock_directory
from fedmq.node import last_update, ledger, personal, residual, saved_tensors
from fedmq.node.settings import STATE_ROOT, NodeSettings
from fedmq.progress_line import ProgressLine
from fedmq.schemas import (
    DpSgd,
    GlobalDelta,
    GlobalModel,
    NodeStatus,
    NodeUpdate,
    SchemaError,
    Topics,
    apply_global_delta,
    decode_global,
    decode_global_delta,
    encode,
    initial_global,
)
from fedmq.schemas.messages import finite_metrics
from fedmq.tasks.holdout import holdout
from fedmq.tasks.layout import TaskLayout, layout_difference, layout_of
from fedmq.tasks.registry import TaskError, is_builtin, load_task
from fedmq.tasks.task import Task

log = structlog.get_logger()


# The files of a node's state (section 13.2 of docs/PROTOCOL.md), found in STATE_ROOT
# itself by versions before the default was per federation and node.
STATE_FILES = ("last_update.msgpack", "residual.npz", "residual.next.npz")
# Files a node keeps since issue 13, never in the old default directory.
PERSONAL_FILES = (personal.FILE, personal.PENDING)


class DataError(ValueError):
    """The node's local data cannot train the federation's model."""


class Refused(ValueError):
    """A global model this node cannot train: another task, or one it cannot find."""


class OverBudget(ValueError):
    """Training this round under DP-SGD would take the node past its --max-epsilon."""


@dataclass(frozen=True)
class PrivateRound:
    """A DP-SGD round about to be trained: the plan's (Z, C), the ledger before it, the
    entry it adds, and the epsilon the node will have spent, at ``delta``."""

    dp: DpSgd
    book: ledger.Ledger
    entry: ledger.Entry
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Trainable:
    """The node's task, ready to train: its params' tree (``jax.eval_shape`` of init), the
    layout it expects on the wire (the shared tensors), the names of its personal tensors,
    and the node's data on the device, split by the plan into training and held-out
    examples (``eval_x`` None when the plan holds out none)."""

    task: Task
    template: Any
    expected: TaskLayout
    personal: frozenset[str]
    personal_shapes: dict[str, tuple[int, ...]]
    split_by: tuple[int, float]  # (plan seed, eval fraction) the split was made for
    order: tuple[str, ...]  # every tensor's name in the task's flattening order
    x: Any
    y: Any
    eval_x: Any
    eval_y: Any


def expected_layout(task: Task) -> tuple[Any, TaskLayout, dict[str, tuple[int, ...]]]:
    """The task's params' tree (shapes only), the layout a global model of it has and its
    personal tensors' shapes (``fedmq.tasks.personal.shared_layout``)."""
    import jax

    from fedmq.tasks.personal import shared_layout
    from fedmq.tasks.seeds import seed_key

    template = jax.eval_shape(task.init, seed_key(0))
    return (template, *shared_layout(task, template))


def mismatch(expected: TaskLayout, model: GlobalModel) -> str | None:
    """How the global model differs from the node's task, in one line, or None: its name,
    version and tensors (``layout_difference``), then its ``task_fingerprint`` if it has one
    (an aggregator before issue 13 sends none: the layout alone is compared)."""
    got = layout_of(model.model, model.task_version, model.params)
    difference = layout_difference(expected, got)
    if difference is None and model.task_fingerprint not in (None, expected.fingerprint):
        difference = (
            f"task fingerprint {model.task_fingerprint} where {expected.fingerprint} was expected"
        )
    return difference


def not_this_task(task: Task, difference: str) -> str:
    """The one line a node refuses another task's model with: the difference, the fix."""
    return (
        f"the global model does not match task {task.name!r}: {difference}: give this node "
        "the --task the aggregator runs"
    )


def adopt_old_state(old: Path, new: Path, *, federation: str, node_id: str) -> bool:
    """Move the state a node of an earlier version kept in ``old`` (the old default,
    ``.fedmq-node`` itself) into ``new``, if it is this node's (its update on record names
    this federation and node) and ``new`` has none yet. True if moved."""
    from fedmq.schemas import decode_update

    saved = last_update.load(old / "last_update.msgpack")
    if saved is None or (new / "last_update.msgpack").exists():
        return False
    try:
        update = decode_update(saved.payload)
    except SchemaError:
        return False
    if (update.federation, update.node_id) != (federation, node_id):
        return False
    new.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        if (old / name).exists():
            (old / name).replace(new / name)
    log.info("node.state_moved", old=str(old), new=str(new))
    return True


def load_local_data(config: NodeSettings) -> Dataset:
    if config.data is not None:
        return load_npz(config.data)
    if config.demo_shard is None:
        raise ValueError("give --data PATH.npz or --demo-shard INDEX/COUNT")
    index, count = config.demo_shard
    train, _ = digits()
    shard = partition(train.y, count, config.partition, config.partition_seed)[index]
    return Dataset(train.x[shard], train.y[shard])


def enable_compile_cache(directory: Path) -> None:
    """Keep XLA executables on disk so a restarted node skips the JIT compile.

    JAX's default thresholds store nothing for small programs; 0 s and -1 bytes store all.
    """
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# The global model is retained and sent again on every (re)subscribe, so a node loses
# nothing by taking it at QoS 0; and an offline node's persistent session then queues
# no stale models on the broker (QoS 0 is not queued for absent clients).
DOWNLINK_QOS = 0
# Fetches again for a model a compact form announced while the fetch brought an older
# one (``Node.on_settled``): a broker takes the aggregator's full model within a round
# trip or two; more means it never will (the aggregator stopped in between).
MAX_FETCHES_FOR_A_MODEL = 3


class Node:
    """One device's participation: state across rounds plus what it publishes."""

    def __init__(
        self,
        config: NodeSettings,
        data: Dataset,
        outbox: edge.Outbox,
        task: Task | None = None,
        *,
        stop: threading.Event | None = None,
        load: Callable[[str], Task] = load_task,
    ) -> None:
        """``task``: the node's ``--task``, loaded; None: the global model's, if built in
        (``load`` loads it: a node group shares one task object per name, so one compile).
        ``stop``: the process's stop event, which cuts a ``--train-delay`` wait short."""
        self.client = outbox.client
        self._load = load
        self.stop = stop if stop is not None else threading.Event()
        self.task = task
        self.config = config
        self.data = data
        self.topics = Topics(config.federation)
        self.outbox = outbox
        self.last_trained: tuple[int, str] | None = None  # (round, base model id)
        self._last_update: bytes | None = None  # payload of that round's update
        # After a restart: the update on disk is resent (not trained again) the first
        # time this process sees its model, whether that copy is retained or live.
        self._resend_saved = False
        saved = last_update.load(self.last_update_path)
        if saved is not None:
            self.last_trained = (saved.round, saved.model_id)
            self._last_update = saved.payload
            self._resend_saved = True
        on_record = saved.round if saved else None
        residual.settle(self.pending_residual_path, self.residual_path, on_record)
        saved_tensors.settle(self.pending_personal_path, self.personal_path, on_record)
        ledger.settle(
            self.pending_ledger_path,
            self.ledger_path,
            None if saved is None else (saved.round, saved.model_id),
        )
        # DP-SGD: (epsilon spent, delta) for the status, from the ledger if there is one
        self._spent: tuple[float, float] | None = None
        try:
            book = ledger.load(self.ledger_path)
        except ledger.LedgerError as error:  # DP training refuses, naming it (_privacy_for)
            log.error("privacy.ledger_unreadable", detail=str(error))
            book = None
        if book is not None:
            delta = config.dp_delta or book.delta
            self._spent = (book.epsilon(delta), delta)
        self._held: GlobalModel | None = None  # the newest global model we have
        # Since the last connect: a model came (either form) that the node holds or has
        # trained on; if not by the time the subscriptions settle, it fetches the full one.
        self._model_since_connect = False
        self._fetching = False  # a fetch of the retained full model is under way
        # What the node had trained on when the fetch began: a retained full copy of that
        # model means the update may have been lost (a reconnect); of a model trained
        # since, that its update went out on this connection already.
        self._trained_before_fetch: tuple[int, str] | None = None
        # The newest model a compact form announced that the node could not build, and
        # the fetches made for it: a fetch may bring an older model (the broker took its
        # subscribe before that model's full form), so the node fetches again, a few times.
        self._wanted: GlobalDelta | None = None
        self._fetches_for_wanted = 0
        self._fetch: Callable[[str], bool] = lambda topic: edge.fetch_retained(
            outbox.client, topic, qos=DOWNLINK_QOS
        )
        self._seen_key: tuple[int, str] | None = None
        self._seen = {"full": 0, "delta": 0}
        self.finished = False
        # Payload bytes received on the global topics since this process started, both
        # forms and catch-ups included: reported in every status (received_bytes).
        self.received_bytes = 0
        self.progress = ProgressLine()  # on a terminal only
        self._trainable: Trainable | None = None
        # The model last refused: round 1 comes on both global topics, and a model is
        # refused (one error status) once per connection, not once per copy.
        self._refused: tuple[int, str] | None = None

    def status(
        self,
        state: str,
        *,
        round: int | None = None,
        model_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        message = NodeStatus(
            federation=self.config.federation,
            node_id=self.config.node_id,
            state=state,
            round=round,
            model_id=model_id,
            num_examples=len(self.data),
            at=time.time(),
            detail=detail,
            dp_epsilon=None if self._spent is None else self._spent[0],
            dp_delta=None if self._spent is None else self._spent[1],
            received_bytes=self.received_bytes,
        )
        self.outbox.publish(self.topics.status(self.config.node_id), encode(message), retain=True)
        where = f" round {round}" if round is not None else ""
        why = f": {detail}" if detail else ""
        self.progress.show(f"{self.config.node_id}{where}: {state}{why}", force=True)

    def on_global(self, payload: bytes, *, retained: bool = False) -> None:
        if not payload:
            return  # the retained model was cleared
        try:
            model = decode_global(payload)
        except SchemaError as error:
            log.error("global.rejected", reason=error.reason, detail=error.detail)
            self.status("error", detail=f"unreadable global model: {error}")
            return
        if model.federation != self.config.federation:
            log.error("global.rejected", reason="wrong_federation", federation=model.federation)
            return
        seen = self._count(model.round, model.model_id, "full")
        self._model_since_connect = True
        # A retained copy of what we had trained on when our fetch began means we fetched
        # after a reconnect; a second live copy with no compact form around means the
        # aggregator republished. In both cases our update may have been lost. (A full
        # copy racing its own compact form is not, nor one of a model trained since.)
        refetched = retained and self.last_trained == self._trained_before_fetch
        self._accept(model, resend=refetched or (seen["full"] > 1 and seen["delta"] == 0))

    def _count(self, round: int, model_id: str, form: str) -> dict[str, int]:
        """Receptions of each form ("full", "delta") of this model so far, this one included."""
        if self._seen_key != (round, model_id):
            self._seen_key, self._seen = (round, model_id), {"full": 0, "delta": 0}
        self._seen[form] += 1
        return self._seen

    def on_global_delta(self, payload: bytes, *, retained: bool = False) -> None:
        """The compact form: rebuild the new model from the one we hold, or fetch it whole.

        A run's first model comes on this topic too: in full, or with a compressed
        downlink as the seed of the task's initial parameters (``init_seed``), so nodes
        that follow compact forms see a new run start."""
        compact = self.read_compact(payload)
        if compact is not None:
            self.on_compact(compact, retained=retained)

    def read_compact(self, payload: bytes) -> "GlobalModel | GlobalDelta | None":
        """A message on global/delta, decoded; None (logged) if unreadable or another
        federation's."""
        compact: GlobalModel | GlobalDelta
        try:
            compact = decode_global_delta(payload)
        except SchemaError as error:
            try:
                if error.reason != "wrong_type":
                    raise
                compact = decode_global(payload)
            except SchemaError as error:
                log.warning("global_delta.rejected", reason=error.reason, detail=error.detail)
                return None
        if compact.federation != self.config.federation:
            return None
        return compact

    def on_compact(self, compact: "GlobalModel | GlobalDelta", *, retained: bool = False) -> None:
        """A readable compact form of our federation (``read_compact``); ``retained``: the
        broker's retained copy, which comes on (re)subscribing."""
        seen = self._count(compact.round, compact.model_id, "delta")
        if (compact.round, compact.model_id) == self.last_trained:
            self._model_since_connect = True
            # a retained copy: we reconnected; a second one: the aggregator republished;
            # or we restarted: our update may have been lost
            if retained or seen["delta"] > 1 or self._resend_saved:
                self._resend_saved = False
                self._resend(compact.round)
            return
        held = self._held
        same = held is not None and (held.round, held.model_id) == (compact.round, compact.model_id)
        if same and held is not None and held.final == compact.final:
            self._model_since_connect = True  # a copy of the model we hold
            return
        # (the final model again, not final: a finished run continued, which opens there)
        if isinstance(compact, GlobalModel):
            self._model_since_connect = True
            self._accept(compact, resend=False)
            return
        if compact.init_seed is not None:
            model = self._initial(compact)
        elif held is None or held.model_id != compact.base_model_id:
            log.info("global_delta.no_base", round=compact.round)
            model = None
        else:
            try:
                model = apply_global_delta(held.params, compact)
            except SchemaError as error:
                log.warning("global_delta.rejected", reason=error.reason, detail=error.detail)
                model = None
        if model is None:
            if self._wanted is None or compact.round > self._wanted.round:
                self._wanted, self._fetches_for_wanted = compact, 0
            self.fetch_full()  # the retained full model is the exact one
            return
        self._model_since_connect = True
        self._accept(model, resend=False)

    def _initial(self, compact: GlobalDelta) -> GlobalModel | None:
        """A run's first model built from its seed (``init_seed``) with the task, as the
        aggregator built it; None (logged with the reason) if that cannot be done here or
        gives other bits (another numpy, JAX or CPU): the node then fetches it in full."""
        from fedmq.tasks.initial import initial_params

        assert compact.init_seed is not None
        source: Task | str
        if self.task is not None:
            source = self.task
        elif is_builtin(compact.model):
            source = compact.model
        else:
            log.warning(
                "global_delta.init_unbuilt",
                round=compact.round,
                reason=f"task {compact.model!r} is not built in and this node has no --task",
            )
            return None
        try:
            params = initial_params(source, compact.init_seed).params
            return initial_global(compact, params)
        except SchemaError as error:
            reason = f"{error.reason}: {error.detail}"
        except Exception as error:  # the task's own init, whatever it raises
            reason = f"init failed: {type(error).__name__}: {error}"
        log.warning(
            "global_delta.init_unbuilt", round=compact.round, seed=compact.init_seed, reason=reason
        )
        return None

    def fetch_full(self) -> None:
        """Take the retained full global model once (the newest), unless already under way:
        subscribed only while the broker hands over its retained copy."""
        if not self._fetching:
            self._trained_before_fetch = self.last_trained
            self._fetching = self._fetch(self.topics.global_model)
            log.info("global.fetching", fetching=self._fetching)

    def on_settled(self, tag: bytes) -> None:
        """The broker answered a tagged unsubscribe (``edge.SETTLED``): after a connect, the
        retained compact form (if any) came before this; after a fetch, the full model."""
        if tag == b"fetch":
            self._fetching = False
            wanted, held = self._wanted, self._held
            if wanted is not None and (held is None or older(held, wanted)):
                if self._fetches_for_wanted < MAX_FETCHES_FOR_A_MODEL:
                    self._fetches_for_wanted += 1
                    log.info("global.fetching_again", round=wanted.round)
                    self.fetch_full()
                    return
                log.warning("global.not_retained", round=wanted.round, model_id=wanted.model_id)
            self._wanted = None
        elif tag == b"connect" and not self._model_since_connect:
            self.fetch_full()  # no compact form to build on: the full model, if there is one

    def _resend(self, round: int) -> None:
        """Send this round's update again; an aggregator that has it counts a duplicate."""
        if self._last_update is not None:
            self.outbox.publish(self.topics.update(self.config.node_id), self._last_update)
            log.info("update.resent", round=round)

    def _accept(self, model: GlobalModel, *, resend: bool) -> None:
        self._held = model
        if model.final:
            if self.last_trained is None:
                # A finished run of this federation, retained from before we started:
                # wait for the aggregator to open a new one.
                self.status("idle", detail="the federation's last run has finished")
                return
            log.info("federation.finished", round=model.round, model_id=model.model_id)
            self.status("done", round=model.round - 1, model_id=model.model_id)
            self.finished = True
            return
        if (model.round, model.model_id) == self.last_trained:
            if resend or self._resend_saved:
                self._resend_saved = False
                self._resend(model.round)
            return
        if not model.selects(self.config.node_id):
            self.status("idle", round=model.round, detail="not selected for this round")
            return
        if (model.round, model.model_id) == self._refused:
            return
        self.train_and_publish(model)

    @property
    def residual_path(self) -> Path:
        return self.config.state_path / "residual.npz"

    @property
    def pending_residual_path(self) -> Path:
        return self.config.state_path / "residual.next.npz"

    @property
    def last_update_path(self) -> Path:
        return self.config.state_path / "last_update.msgpack"

    @property
    def ledger_path(self) -> Path:
        return self.config.state_path / ledger.FILE

    @property
    def pending_ledger_path(self) -> Path:
        return self.config.state_path / ledger.PENDING

    @property
    def personal_path(self) -> Path:
        return self.config.state_path / personal.FILE

    @property
    def pending_personal_path(self) -> Path:
        return self.config.state_path / personal.PENDING

    def _personal_for(self, ready: Trainable, model: GlobalModel) -> dict[str, np.ndarray]:
        """This round's personal tensors: the ones the node kept, or the task's initial
        ones (seeded by the plan, as the aggregator seeds the shared ones) when it has none
        usable for this run."""
        if not ready.personal:
            return {}
        saved = saved_tensors.load(self.personal_path)
        problem = personal.usable(
            saved,
            round_number=model.round,
            fingerprint=ready.expected.fingerprint,
            layout=ready.personal_shapes,
        )
        if saved is not None and problem is None:
            return saved.tensors
        from fedmq.tasks.naming import flatten_params
        from fedmq.tasks.seeds import seed_key

        log.info("personal.initialised", round=model.round, reason=problem)
        initial = flatten_params(ready.task.init(seed_key(model.plan.seed)))
        return {name: initial[name] for name in ready.personal}

    def _residual_for(self, model: GlobalModel, pipeline: Pipeline) -> ErrorFeedbackState | None:
        """The error-feedback state to start this round from (zeros when stale or absent)."""
        if not pipeline.error_feedback:
            return None
        saved = residual.load(self.residual_path)
        if saved is not None:
            skips = model.plan.mode == "async"
            problem = saved.usable_for(model.round, str(pipeline), model.layout, skips=skips)
            if problem is None:
                return ErrorFeedbackState(saved.residual)
            log.info("residual.discarded", reason=problem)
        return error_feedback_init(model.layout)

    def on_connected(self) -> None:
        """Refresh our retained status: a last will may have marked us offline."""
        self._model_since_connect = False  # until the subscriptions settle (on_settled)
        self._fetching = False  # an unanswered fetch died with the connection
        self._wanted = None  # the connect's own fetch, if one is needed, takes the newest
        self._refused = None  # the retained copy comes again: say so again, after "online"
        round, model_id = self.last_trained or (None, None)
        self.status("submitted" if round else "online", round=round, model_id=model_id)

    def _task_of(self, model: GlobalModel) -> Task:
        """The task to train ``model`` with: ``--task``, or the built-in one it names."""
        if self.task is not None:
            return self.task
        if self._trainable is not None and self._trainable.task.name == model.model:
            return self._trainable.task
        if not is_builtin(model.model):
            raise Refused(
                f"the global model is task {model.model!r}, which is not built in: start the "
                "node with --task MODULE:ATTRIBUTE (the same the aggregator runs)"
            )
        try:
            return self._load(model.model)
        except TaskError as error:
            raise Refused(str(error)) from None

    def trainable(self, model: GlobalModel) -> Trainable:
        """The node's task ready for ``model``; Refused (one line) if it does not match,
        DataError if the node's data cannot train it."""
        task = self._task_of(model)
        split_by = (model.plan.seed, model.plan.eval_fraction)
        known = self._trainable
        if known is None or known.task is not task or known.split_by != split_by:
            import jax.numpy as jnp

            from fedmq.tasks.naming import named_leaves
            from fedmq.tasks.training import data_problem

            template, expected, own = expected_layout(task)
            difference = mismatch(expected, model)  # another task: say that, not its data
            if difference is not None:
                raise Refused(not_this_task(task, difference))
            problem = data_problem(task, template, self.data.x, self.data.y)
            if problem is not None:
                raise DataError(f"local data cannot train model {task.name}: {problem}")
            train, held = holdout(
                len(self.data), split_by[1], seed=split_by[0], node_id=self.config.node_id
            )
            x, y = self.data.x[train], self.data.y[train]
            eval_x = jnp.asarray(self.data.x[held]) if len(held) else None
            eval_y = jnp.asarray(self.data.y[held]) if len(held) else None
            known = self._trainable = Trainable(
                task, template, expected, frozenset(own), own, split_by,
                tuple(name for name, _, _ in named_leaves(template)),
                jnp.asarray(x), jnp.asarray(y), eval_x, eval_y,
            )  # fmt: skip
        difference = mismatch(known.expected, model)
        if difference is not None:
            raise Refused(not_this_task(task, difference))
        return known

    def train_and_publish(self, model: GlobalModel) -> None:
        from fedmq.tasks.evaluation import evaluate_task
        from fedmq.tasks.naming import flatten_params, unflatten_params
        from fedmq.tasks.personal import join, split
        from fedmq.tasks.training import delta, train_local

        try:
            pipeline = parse_spec(model.plan.compression)
            ready = self.trainable(model)
            private = self._privacy_for(ready, model)
        except DataError:
            raise
        except OverBudget as error:
            self._refused = (model.round, model.model_id)
            log.warning("privacy.budget_spent", round=model.round, detail=str(error))
            self.status("idle", round=model.round, detail=str(error))
            return
        except ValueError as error:
            self._refused = (model.round, model.model_id)
            log.error("global.refused", round=model.round, reason=str(error))
            self.status("error", round=model.round, detail=f"cannot build this model: {error}")
            return
        with structlog.contextvars.bound_contextvars(round=model.round):
            self.status("training", round=model.round, model_id=model.model_id)
            started = time.perf_counter()
            kept = self._personal_for(ready, model)
            received = unflatten_params(ready.template, join(ready.order, model.params, kept))
            measured = None  # federated evaluation: the received model, before training
            if ready.eval_x is not None:
                found = evaluate_task(ready.task, received, ready.eval_x, ready.eval_y)
                measured = finite_metrics(found)
            if private is None:
                trained, loss = train_local(
                    ready.task,
                    received,
                    ready.x,
                    ready.y,
                    model.plan,
                    node_id=self.config.node_id,
                    round_number=model.round,
                )
            else:
                trained, loss = self._train_private(ready, received, model, private)
            shared, own = split(flatten_params(trained), ready.personal)
            change = delta(shared, model.params)
            if not math.isfinite(loss) or not all(np.isfinite(a).all() for a in change.values()):
                # diverged: sending would be rejected, and keeping it would poison the residual
                rate = model.plan.learning_rate
                shown = f"; loss {loss:g}" if private is None else ""  # DP: not private
                log.error("training.diverged", round=model.round, loss=loss, learning_rate=rate)
                why = (
                    f"local training diverged (NaN or Inf{shown}) at learning rate "
                    f"{rate:g}: lower the aggregator's --learning-rate"
                )
                self.status("error", round=model.round, detail=why)
                return
            if not self._simulated_delay(model.round):
                return  # stopped while simulating a slow device: the update is not sent
            started_compress = time.perf_counter()
            state = self._residual_for(model, pipeline)
            rng = np.random.default_rng([model.plan.seed, zlib.crc32(self.config.node_id.encode()),
                                         model.round, 0, 1])  # fmt: skip
            encoded, new_state = pipeline.compress(change, rng, state)
            update = NodeUpdate(
                federation=self.config.federation,
                node_id=self.config.node_id,
                round=model.round,
                base_model_id=model.model_id,
                num_examples=len(ready.x),
                train_loss=loss if private is None else 0.0,  # not private: not sent
                train_seconds=time.perf_counter() - started,
                delta=encoded,
                compression=str(pipeline),
                sent_at=time.time(),
                metrics=measured,
                eval_examples=None if measured is None else len(ready.eval_x),
                dp_epsilon=None if private is None else private.epsilon,
                dp_delta=None if private is None else private.delta,
            )
            payload = encode(update)
            compress_seconds = time.perf_counter() - started_compress
            # On disk before it leaves: a crash from here on resends these bytes. The
            # update on record is the commit point; the residual that goes with it waits
            # beside it until then (residual.settle), so a crash between the two writes
            # keeps the previous round's residual, which that round's retraining needs.
            if new_state is not None:
                residual.save(
                    self.pending_residual_path,
                    residual.SavedResidual(model.round, str(pipeline), new_state.residual),
                )
            if private is not None:  # the ledger with this round waits the same way
                ledger.save(self.pending_ledger_path, private.book.with_entry(private.entry))
            if own:  # the personal tensors wait the same way (node.personal)
                tag = ready.expected.fingerprint
                saved_tensors.save(
                    self.pending_personal_path, saved_tensors.SavedTensors(model.round, tag, own)
                )
            last_update.save(
                self.last_update_path, last_update.LastUpdate(model.round, model.model_id, payload)
            )
            if new_state is not None:
                residual.promote(self.pending_residual_path, self.residual_path)
            if own:
                saved_tensors.promote(self.pending_personal_path, self.personal_path)
            if private is not None:
                ledger.promote(self.pending_ledger_path, self.ledger_path)
                self._spent = (private.epsilon, private.delta)
            self.outbox.publish(self.topics.update(self.config.node_id), payload)
            self.last_trained = (model.round, model.model_id)
            self._resend_saved = False
            self._last_update = payload
            self.status("submitted", round=model.round, model_id=model.model_id)
            log.debug(
                "update.published",
                bytes=len(payload),
                compress_seconds=compress_seconds,
                loss=loss,
                train_seconds=update.train_seconds,
            )

    def _privacy_for(self, ready: Trainable, model: GlobalModel) -> PrivateRound | None:
        """The DP-SGD round ``model.plan.dp_sgd`` asks for, None without one. Refused if
        the plan also holds examples out (their metrics would leave unprotected), a
        ``ledger.LedgerError`` if the ledger cannot be read, OverBudget past --max-epsilon."""
        dp = model.plan.dp_sgd
        if dp is None:
            return None
        if ready.eval_x is not None:
            raise Refused(
                f"plan.eval_fraction {model.plan.eval_fraction} with dp_sgd: the held-out "
                "examples' metrics would leave this node without differential privacy; run "
                "the aggregator with --eval-fraction 0"
            )
        from fedmq.privacy import default_delta, sampling_rate, steps_per_round

        plan, count = model.plan, len(ready.x)
        book = ledger.load(self.ledger_path) or ledger.new(default_delta(count))
        delta = self.config.dp_delta or book.delta
        entry = ledger.Entry(
            round=model.round,
            model_id=model.model_id,
            q=sampling_rate(count, plan.batch_size),
            noise=dp.noise,
            steps=steps_per_round(count, plan.batch_size, plan.local_epochs),
        )
        spent, after = book.epsilon(delta), book.epsilon(delta, extra=entry)
        self._spent = (spent, delta)
        limit = self.config.max_epsilon
        if limit is not None and after > limit:
            raise OverBudget(
                f"privacy budget spent: this round would take epsilon from {spent:.4g} to "
                f"{after:.4g} (delta {delta:.3g}), past --max-epsilon {limit:g}; the node "
                "trains no more under DP-SGD"
            )
        return PrivateRound(dp, book, entry, after, delta)

    def _train_private(
        self, ready: Trainable, received: Any, model: GlobalModel, private: PrivateRound
    ) -> tuple[Any, float]:
        """DP-SGD on the node's data, its samples and noise drawn from the ledger's secret."""
        import jax
        import jax.numpy as jnp

        from fedmq.tasks.private_training import train_private

        rng, noise = private.book.randomness(model.round, model.model_id)
        words = jnp.asarray(ledger.noise_key_words(noise))
        key = jax.random.wrap_key_data(words, impl="threefry2x32")
        return train_private(
            ready.task, received, ready.x, ready.y, model.plan, private.dp, rng=rng, key=key
        )

    def _simulated_delay(self, round: int) -> bool:
        """``--train-delay``, a simulation knob: wait that long after training, as a slower
        device would (paho's network thread keeps the connection meanwhile). False if the
        stop event cut the wait short."""
        delay = self.config.train_delay
        if delay <= 0:
            return True
        log.info("training.delayed", round=round, train_delay=delay)
        if self.stop.wait(delay):
            log.info("training.delay_interrupted", round=round, train_delay=delay)
            return False
        return True


def run(config: NodeSettings, stop: threading.Event) -> int:
    """Take part until the run is over (with ``exit_when_done``: exit 0) or ``stop`` is set
    (exit 130). Holds a lock on the state directory meanwhile (``DirectoryLocked`` if
    another process has it). A node that stops on an error once connected (its data
    cannot train the model, its state cannot be written) leaves the reason as the
    ``detail`` of its retained ``offline`` status, then raises."""
    structlog.contextvars.bind_contextvars(node=config.node_id, federation=config.federation)
    lock = claim_state(config)
    try:
        return _run(config, stop)
    finally:
        lock.release()


def claim_state(config: NodeSettings) -> DirectoryLock:
    """Lock the node's state directory (``DirectoryLocked`` if another process has it) and
    move in what a node of an earlier version kept in the old default directory."""
    lock = lock_directory(config.state_path)
    try:
        if config.state_path == STATE_ROOT / config.federation / config.node_id:
            adopt_old_state(
                STATE_ROOT, config.state_path, federation=config.federation, node_id=config.node_id
            )
    except BaseException:
        lock.release()
        raise
    return lock


def _run(config: NodeSettings, stop: threading.Event) -> int:
    enable_compile_cache(config.state_path / "jax-cache")
    data = load_local_data(config)  # unreadable: one line and exit 2, before connecting
    task = load_task(config.task) if config.task is not None else None  # the same
    inbox: queue.Queue[edge.Received] = queue.Queue()
    node = open_node(config, data, inbox, task, stop=stop)
    edge.start(node.client, config.broker)
    log.info("node.started", examples=len(data), broker=str(config.broker))
    try:
        while not stop.is_set() and not (node.finished and config.exit_when_done):
            edge.check(node.client)
            try:
                batch = edge.drain(inbox, inbox.get(timeout=0.2))
            except queue.Empty:
                continue
            handle(node, batch)
    except edge.LoginRefused:
        edge.stop(node.client)
        raise
    except Exception as error:  # the CLI prints it: one line, exit 2
        close_node(node, error=error)
        raise
    close_node(node)
    log.info("node.stopped", last_trained=node.last_trained)
    return 0 if node.finished else 130


def older(held: GlobalModel, wanted: GlobalDelta) -> bool:
    """Whether the model a fetch brought comes before the one a compact form announced:
    an earlier round, published no later. A later run (or a rollback) starts again at a
    lower round but is published later (``created_at``), so its model is newer."""
    return held.round < wanted.round and held.created_at <= wanted.created_at


def open_node(
    config: NodeSettings,
    data: Dataset,
    inbox: edge.Inbox,
    task: Task | None,
    *,
    stop: threading.Event,
    load: Callable[[str], Task] = load_task,
) -> "Node":
    """The node's MQTT client (not started: ``edge.start``), handing what it receives to
    ``inbox``, and the ``Node`` that owns its state. ``fedmq node`` opens one;
    ``fedmq node-group`` many, sharing one ``load`` so they share the task (one compile)."""
    topics = Topics(config.federation)
    offline = NodeStatus(federation=config.federation, node_id=config.node_id, state="offline")
    client = edge.make_client(
        edge.make_client_id(config.federation, "node", config.node_id),
        # global/delta only: the full model is fetched when needed (Node.on_settled,
        # fetch_full); a persistent session's old subscription to it goes at each connect
        subscriptions=[(topics.global_delta, DOWNLINK_QOS)],
        settle=[topics.global_model],
        will=(topics.status(config.node_id), encode(offline)),
        inbox=inbox,
        persistent=True,  # a stable session; the QoS 0 downlink queues nothing while away
    )
    return Node(config, data, edge.Outbox(client), task, stop=stop, load=load)


def handle(node: "Node", batch: list[edge.Received]) -> None:
    """What the node does with the messages that arrived together (training included)."""
    if any(r.topic == edge.CONNECTED for r in batch):
        node.on_connected()  # its status counts what came before this batch
    # A node that fell behind trains on the newest model only: the newest full one
    # first, then the newest compact one (which may build on it).
    newest = {r.topic: r for r in batch if r.topic not in (edge.CONNECTED, edge.SETTLED)}
    node.received_bytes += sum(  # delivered, whether handled or skipped as older
        len(r.payload) for r in batch if r.topic in node.topics.global_topics
    )
    if node.topics.global_model in newest:
        full = newest[node.topics.global_model]
        node.on_global(full.payload, retained=full.retain)
    if node.topics.global_delta in newest:
        compact = newest[node.topics.global_delta]
        node.on_global_delta(compact.payload, retained=compact.retain)
    for settled in (r for r in batch if r.topic == edge.SETTLED):
        node.on_settled(settled.payload)


def close_node(node: "Node", *, error: Exception | None = None) -> None:
    """Leave the broker: the last status retained (``offline`` with the error's reason if
    the node stopped on one; none over ``done``), then disconnect without a last will."""
    if error is not None:
        node.status("offline", detail=f"stopped on an error: {error}")
        node.progress.close()
    else:
        node.progress.close()
        if not node.finished:
            node.status("offline")
    leave(node.client, node.outbox, node.topics)


# How long a node tries to hand its last status to the broker before it disconnects.
LEAVE_SECONDS = 10.0


def leave(client: edge.Client, outbox: edge.Outbox, topics: Topics) -> None:
    """Hand the last status to the broker, then disconnect so that no last will replaces it.

    Connected, first unsubscribe from the global topics and wait for the UNSUBACK: a
    socket closed with a global model unread in it makes mosquitto drop the connection as
    lost and publish the will (``offline``) over the retained ``done`` (as for the
    aggregator: ``aggregator.app.leave``, ``edge.unsubscribe``). Then wait for the PUBACKs,
    at most LEAVE_SECONDS, and never on a broker that is gone (a stop must take < 1 s)."""
    if client.is_connected() and not edge.unsubscribe(
        client, [topics.global_model, topics.global_delta], timeout=2
    ):
        log.warning("node.unsubscribe_unacknowledged")
    deadline = time.monotonic() + LEAVE_SECONDS
    while client.is_connected() and not outbox.flush(timeout=0.2):
        if client.refused is not None or time.monotonic() > deadline:
            break
    if outbox.unacknowledged:
        log.warning("node.unacknowledged", messages=outbox.unacknowledged)
    edge.stop(client)
