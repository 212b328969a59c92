"""The aggregator process: config in, MQTT loop around ``Aggregator``, report out.

Crash safety lives here at the edge: the process resumes from its state directory
(checkpoint + journal of the open round), uses a persistent MQTT session so the broker
queues updates while it is away, and acknowledges each update (PUBACK) only after the
journal holding it was fsynced, once per batch of messages (group commit). An update
that was not yet acknowledged when the process died is redelivered by the broker.
"""

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import structlog

from fedmq import mqtt as edge
from fedmq.aggregator.broker_drops import BrokerDrops
from fedmq.aggregator.buffer import BufferPolicy
from fedmq.aggregator.checkpoint import (
    Checkpoint,
    CheckpointError,
    StateDir,
    changed_setting,
    ways_out,
)
from fedmq.aggregator.dp_fedavg import DpFedAvg, parse_dp_fedavg
from fedmq.aggregator.evaluate import (
    Evaluator,
    evaluation_set_problem,
    mlp_evaluator,
    task_evaluator,
)
from fedmq.aggregator.policy import VersionPolicy
from fedmq.aggregator.publisher import Publish
from fedmq.aggregator.robust import DEFAULT, FEDAVG, Clip, Rule, parse_rule, with_clip
from fedmq.aggregator.rounds import RoundPolicy, default_quorum
from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
from fedmq.aggregator.settings import (
    DEFAULT_AGGREGATION,
    AggregatorSettings,
    eval_fraction_of,
    fingerprint_mismatch,
)
from fedmq.aggregator.site import split_problem
from fedmq.compression import parse_spec
from fedmq.datasets import DIGITS_CLASSES, DIGITS_FEATURES, Dataset, digits, load_npz
from fedmq.files import lock_directory
from fedmq.model_file import ModelFileError, save_problem, write_model
from fedmq.models import MLP, get_model
from fedmq.progress_line import ProgressLine
from fedmq.report import (
    build_report,
    dp_sgd_entry,
    final_delivery_entry,
    mode_entry,
    proximal_mu_entry,
    write_report,
)
from fedmq.schemas import (
    GlobalModel,
    SchemaError,
    ServerStatus,
    Topics,
    TrainingPlan,
    decode_global,
    decode_status,
    encode,
)
from fedmq.schemas.sys_topics import DROPPED, VERSION, counts_drops, parse_counter
from fedmq.settings import parse_dp_sgd, parse_server_optimizer, staleness_exponent
from fedmq.tasks.layout import layout_difference, layout_of
from fedmq.tasks.registry import EXAMPLES, TaskError, is_builtin, load_task
from fedmq.tasks.task import Task

log = structlog.get_logger()


def load_test_set(spec: str | None, task_name: str = "digits-mlp") -> Dataset | None:
    """``--test-data``: none, digits, a path to an .npz, or auto (``auto_test_set``; a
    built-in example task's own test split, ``builtin_data``)."""
    if spec == "auto":
        if task_name in EXAMPLES:
            from fedmq.tasks.builtin_data import builtin_data

            data = builtin_data(task_name)
            return None if data is None else data[1]
        spec = auto_test_set(task_name)
    if spec is None:
        return None
    if spec == "digits":
        return digits()[1]
    return load_npz(Path(spec))


def auto_test_set(task_name: str) -> str | None:
    """``--test-data auto`` of the tasks without a test split of their own: the digits test
    split for the digits tasks (the built-in MLPs of 64 features and 10 classes), none for
    any other task (the built-in examples' own: ``load_test_set``)."""
    if is_builtin(task_name):
        sizes = get_model(task_name).sizes
        if (sizes[0], sizes[-1]) == (DIGITS_FEATURES, DIGITS_CLASSES):
            return "digits"
    return None


@dataclass(frozen=True)
class RunTask:
    """What the aggregator needs of its task: name, version, initial parameters (named
    wire tensors) and, for a built-in one, its MLP (numpy evaluation, no JAX)."""

    name: str
    version: str | None
    params: dict[str, np.ndarray]
    model: MLP | None
    task: Task | None  # a task that is not built in; None for the built-in MLPs
    template: Any = None  # the task's own tree (jax.eval_shape(task.init, key)), if task
    personal: frozenset[str] = frozenset()  # tensors nodes keep (Task.personal): not here

    def evaluator(self, test: Dataset | None) -> Evaluator | None:
        """Central evaluation on ``test``, or None: without a test set, and for a task with
        personal parameters (each node has its own; only federated evaluation sees them)."""
        if test is None or self.personal:
            return None
        if self.model is not None:
            return mlp_evaluator(self.model, test)
        return task_evaluator(self.task, self.template, test)


def run_task(spec: str, seed: int) -> RunTask:
    """The task ``spec`` names and its initial parameters from ``seed``: a built-in MLP's
    from fedmq.models in numpy (no JAX), any other's ``flatten_params(task.init(seed_key(
    seed)))``. TaskError or NamingError (ValueErrors, one line) if it cannot be had."""
    from fedmq.tasks.initial import initial_params

    if is_builtin(spec):
        return RunTask(spec, None, initial_params(spec, seed).params, get_model(spec), None)
    from fedmq.tasks.personal import PersonalError

    task = load_task(spec)
    try:
        initial = initial_params(task, seed)
    except PersonalError:
        raise
    except Exception as error:
        raise TaskError(
            f"task {task.name!r}: init failed: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else '(no message)'}"
        ) from None
    shared, template, personal = initial
    return RunTask(task.name, task.version_text, shared, None, task, template, personal)


def dp_fedavg_of(config: AggregatorSettings) -> DpFedAvg | None:
    """``--dp-fedavg``, or None; ValueError (one line) for a combination whose privacy
    cannot be argued: a robust rule (its own clipping and weights change what one node
    can move), asynchronous mode (a node may count in several versions of one window),
    site aggregators (a site's update is many nodes)."""
    if config.dp_fedavg is None:
        return None
    problem = None
    if config.mode != "sync":
        problem = "--mode async"
    elif config.site is not None or config.sites:
        problem = "--site or --sites"
    elif config.clip_norm is not None or config.aggregation not in (
        DEFAULT_AGGREGATION,
        "fedavg",
    ):
        problem = f"--aggregation {config.aggregation} (or --clip-norm)"
    if problem is not None:
        raise ValueError(
            f"--dp-fedavg with {problem}: its privacy is argued for plain rounds of FedAvg "
            "only (docs/privacy.md); drop one of them"
        )
    return parse_dp_fedavg(config.dp_fedavg)


def aggregation_rule(config: AggregatorSettings) -> Rule:
    """``--aggregation`` with ``--clip-norm`` folded in; ValueError if they clash. The
    default rule's adaptive clip gives way to ``--clip-norm`` (its examples cap stays).
    A site aggregator (``--site``) or the root of sites (``--sites``) refuses a rule that
    cannot be split over sites (``aggregator.site.split_problem``)."""
    if config.dp_fedavg is not None:  # its own clipping, one vote per node (dp_fedavg_of)
        return FEDAVG
    rule = parse_rule(config.aggregation)
    if config.clip_norm is not None:
        if rule == DEFAULT:
            rule = replace(rule, clip=None)
        rule = with_clip(rule, Clip(config.clip_norm))
    where = "--site" if config.site is not None else "--sites" if config.sites else None
    problem = None if where is None else split_problem(rule, where=where)
    if problem is not None:
        raise ValueError(problem)
    return rule


def version_policy(config: AggregatorSettings) -> VersionPolicy:
    """How versions are made: ``--mode sync`` rounds (``round_policy``) or the ``--mode
    async`` buffer of ``--buffer`` updates, weighted by ``--staleness``, none older than
    ``--max-staleness``; ``--round-timeout`` makes a version from a buffer short of K."""
    if config.mode == "sync":
        return round_policy(config)
    return BufferPolicy(
        buffer=config.buffer_size,
        exponent=staleness_exponent(config.staleness),
        max_staleness=config.max_staleness,
        deadline_seconds=config.round_timeout,
        sample_fraction=config.sample_fraction,
    )


def round_policy(config: AggregatorSettings) -> RoundPolicy:
    """When rounds close: ``--round-timeout`` (default 300 s) and ``--min-nodes`` (default
    more than half of ``--nodes``)."""
    return RoundPolicy(
        expected_nodes=config.nodes,
        min_nodes=config.min_nodes
        if config.min_nodes is not None
        else default_quorum(config.nodes),
        deadline_seconds=config.round_timeout,
        sample_fraction=config.sample_fraction,
    )


def build_aggregator(
    config: AggregatorSettings,
    publish: Publish,
    store: StateDir | None = None,
    *,
    broker_drops: BrokerDrops | None = None,
) -> Aggregator:
    task = run_task(config.task_spec, config.seed)
    num_params = sum(int(array.size) for array in task.params.values())
    test = load_test_set(config.test_data, config.task_spec)
    evaluator = task.evaluator(test)
    if test is not None and evaluator is None:
        log.warning("aggregator.no_central_evaluation", reason="the task has personal parameters")
    if test is not None and evaluator is not None:  # refused now, not after round 1
        problem = evaluation_set_problem(task.model, task.task, task.template, test)
        if problem is not None:
            raise ValueError(
                f"--test-data {config.test_data}: cannot evaluate task {task.name}: {problem}"
            )
    settings = RoundSettings(
        federation=config.federation,
        model_name=task.name,
        model=task.model,
        rounds=config.rounds,
        policy=version_policy(config),
        plan=TrainingPlan(
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            local_epochs=config.local_epochs,
            seed=config.seed,
            compression=str(parse_spec(config.compression)),
            eval_fraction=eval_fraction_of(
                config.eval_fraction,
                has_test_set=evaluator is not None,
                private=config.dp_sgd is not None,
            ),
            proximal_mu=config.proximal_mu,
            mode=config.mode,
            dp_sgd=None if config.dp_sgd is None else parse_dp_sgd(config.dp_sgd),
        ),
        max_update_bytes=config.max_update_bytes or dense_update_bound(num_params),
        known_nodes=frozenset(config.node_ids) if config.node_ids is not None else None,
        aggregation=aggregation_rule(config),
        task_version=task.version,
        model_floats=num_params,
        server_optimizer=str(parse_server_optimizer(config.server_optimizer)),
        accepted_compression=config.upstream_compression if config.sites else None,
        dp_fedavg=dp_fedavg_of(config),
        downlink_compression=config.downlink_compression,
        final_downlink_compression=config.final_downlink_compression,
        init_seed=config.seed,  # run_task made the initial model from it
        final_delivery_wait=config.final_delivery_wait,
    )
    return Aggregator(
        settings,
        task.params,
        publish=publish,
        evaluator=evaluator,
        store=store,
        broker_dropped=(broker_drops or BrokerDrops()).take,
    )


def progress_text(aggregator: Aggregator) -> str:
    """``round 7/30: 4/10 reported (min 8), open 2.1 s`` for a terminal; in asynchronous
    mode ``version 7/30: 2/5 buffered, open 0.3 s``."""
    rounds = aggregator.settings.rounds
    if aggregator.done:  # counting the final model's delivery (docs/PROTOCOL.md 8.4)
        return (
            f"final model out after {rounds}: {len(aggregator.awaited())} nodes still to "
            f"report it, {aggregator.round_age():.1f} s"
        )
    status = aggregator.server_status()
    if aggregator.settings.plan.mode == "async":
        return (
            f"version {status.round}/{rounds}: {status.reported}/{status.expected_nodes} "
            f"buffered, open {aggregator.round_age():.1f} s"
        )
    quorum = f" (min {status.min_nodes})" if status.min_nodes < status.expected_nodes else ""
    return (
        f"round {status.round}/{rounds}: {status.reported}/{status.expected_nodes} "
        f"reported{quorum}, open {aggregator.round_age():.1f} s"
    )


def note_presence(aggregator: Aggregator, node_id: str, payload: bytes) -> None:
    """A node's retained status or last will: online unless it says offline (or was
    cleared); an unreadable status is ignored. A node in ``error`` (it refused the model:
    another task, data that cannot train it, a diverged round) is logged with its reason,
    so the operator of a round short of quorum sees why here, not only on that node."""
    if not payload:
        aggregator.note_presence(node_id, False)
        return
    try:
        status = decode_status(payload)
    except SchemaError:
        return
    aggregator.note_presence(node_id, status.state != "offline")
    if status.received_bytes is not None:
        aggregator.note_received(node_id, status.received_bytes, final=status.through_with_final)
    if status.state == "error":
        log.warning("node.error", node_id=node_id, round=status.round, detail=status.detail)


def resume_or_start(
    aggregator: Aggregator, store: StateDir | None, *, rollback_to: int | None = None
) -> bool:
    """Restore the run kept in ``store`` if there is one (True); else False (a new run).

    ``rollback_to``: resume instead from the kept checkpoint of that round, forgetting
    the rounds after it (``StateDir.rollback``); the aggregation rule may differ. A
    larger ``rounds`` than the kept run's continues it (a finished run reopens its last
    model as the next round). Raises CheckpointError, with one line naming what differs
    and the ways out, if the directory holds another run's state, the run has gone past
    ``rounds`` or the round to roll back to is not kept."""
    checkpoint = store.load() if store is not None else None
    if rollback_to is not None:
        if store is None:
            raise CheckpointError(f"--rollback-to {rollback_to} needs a --state-dir")
        checkpoint = rollback_point(store, checkpoint, rollback_to)
    if store is None or checkpoint is None:
        return False
    changed = fingerprint_mismatch(checkpoint.fingerprint, aggregator.settings.fingerprint)
    if changed is not None:
        raise CheckpointError(changed_setting(store.directory, *changed))
    kept = decode_global(checkpoint.global_payload)
    problem = task_mismatch(kept, aggregator)
    if problem is not None:
        raise CheckpointError(
            f"--task {aggregator.settings.model_name}: {problem}, unlike the run kept in "
            f"{store.directory}: {ways_out('the task it was started with')}"
        )
    # the fewest rounds that continue the run: those it closed, or up to its open round
    least = kept.round - 1 if kept.final else kept.round
    rounds = aggregator.settings.rounds
    if rounds < least:
        reached = f"finished after {least} rounds" if kept.final else f"round {least} is open"
        raise CheckpointError(
            f"--rounds {rounds} is fewer than the run kept in {store.directory} has "
            f"reached ({reached}): {ways_out(f'--rounds {least} or more')}"
        )
    if rollback_to is not None:
        store.rollback(rollback_to)
        log.warning("run.rolled_back", round=rollback_to, model_id=kept.model_id)
    else:
        store.forget_after(checkpoint.version)  # versions a rollback discarded, if any
    store.open_journal(checkpoint.version)
    aggregator.resume(checkpoint, store.journal_records(checkpoint.version))
    if aggregator.done:
        log.info(
            "aggregator.already_finished",
            rounds=least,
            hint=f"--rounds above {least} continues the run, --fresh starts a new one",
        )
    return True


def task_mismatch(kept: GlobalModel, aggregator: Aggregator) -> str | None:
    """How this aggregator's task differs from the kept run's (its layout fingerprint),
    in one line, or None. A run kept before issue 13 has no fingerprint: not compared."""
    if kept.task_fingerprint is None or kept.task_fingerprint == aggregator.task_fingerprint:
        return None
    ours = layout_of(aggregator.settings.model_name, aggregator.settings.task_version,
                     aggregator.params)  # fmt: skip
    theirs = layout_of(kept.model, kept.task_version, kept.params)
    difference = layout_difference(theirs, ours) or (
        f"layout fingerprint {aggregator.task_fingerprint} where {kept.task_fingerprint} was kept"
    )
    return difference


def rollback_point(store: StateDir, current: Checkpoint | None, round: int) -> Checkpoint:
    """The kept checkpoint to roll back to; CheckpointError (one line) if there is none."""
    if current is None:
        raise CheckpointError(f"--rollback-to {round}: no run is kept in {store.directory}")
    kept = [r for r in store.kept_versions() if r <= current.version]
    checkpoint = store.load_kept(round) if round in kept else None
    if checkpoint is None and not kept:  # a state directory of an older fedmq
        raise CheckpointError(
            f"--rollback-to {round}: the run kept in {store.directory} has no checkpoints "
            "of earlier rounds (it was written before fedmq kept them)"
        )
    if checkpoint is None:
        raise CheckpointError(
            f"--rollback-to {round}: the run kept in {store.directory} keeps rounds "
            f"{kept[0]}-{kept[-1]} (the last {store.keep} opened): give one of those"
        )
    return checkpoint


def make_publish(outbox: edge.Outbox, topics: Topics) -> Publish:
    """How the aggregator publishes: ``global`` and ``global/delta`` at QoS 0, the rest at
    QoS 1 (docs/PROTOCOL.md section 1, "QoS").

    The broker delivers at the lower of the publish and the subscription QoS and queues
    no QoS 0 message for an offline session, so no node account, whatever QoS it
    subscribes with, can make the broker keep models for it while it is away. A model
    lost on the way to the broker is sent again after a reconnect (``republish``), and
    the ``server`` status that follows each model is QoS 1: its PUBACK means the broker
    has the model before it (one connection, handled in order)."""
    downlink = (topics.global_model, topics.global_delta)

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        outbox.publish(topic, payload, retain=retain, qos=0 if topic in downlink else 1)

    return publish


def saving_model(publish: Publish, topic: str, path: Path) -> Publish:
    """``publish``, and each global model published on ``topic`` also written to ``path``
    (``--save-model``), atomically, before it goes out; the same model published again
    (a reconnect, a restart) is not rewritten. A write that fails is logged and the run
    goes on: the state directory keeps every model for ``fedmq export``."""
    saved: list[bytes] = []

    def publish_and_save(topic_: str, payload: bytes, retain: bool) -> None:
        if topic_ == topic and (not saved or saved[0] != payload):
            try:
                model = write_model(path, payload)
            except (ModelFileError, SchemaError) as error:
                log.error("aggregator.save_model_failed", path=str(path), error=str(error))
            else:
                saved[:] = [payload]
                log.debug("aggregator.model_saved", path=str(path), model_id=model.model_id)
        publish(topic_, payload, retain)

    return publish_and_save


LEAVE_SECONDS = 10.0  # the most a stop waits for the broker's acknowledgements


def leave(
    client: mqtt.Client,
    outbox: edge.Outbox,
    topics: Topics,
    *,
    done: bool,
    loop: edge.Loop | None = None,
) -> None:
    """Wait for the broker to acknowledge what we published, then disconnect cleanly.

    After a finished run (``done``) first unsubscribe from everything and wait for the
    UNSUBACK: the broker stops queueing updates for this session and sends us nothing
    more, so we close no socket with unread data in it, the broker reads our DISCONNECT
    and discards the will (``offline``, round 0) that would otherwise replace the
    retained ``done`` (``edge.unsubscribe``). A stopped run keeps its subscriptions: the
    broker queues updates for its restart. Messages still arriving are not handled any
    more: unacknowledged, the broker keeps them. With ``loop`` the client's network loop
    runs in this thread (``edge.Loop``), and runs here while we wait."""
    wanted = [topics.all_updates, topics.all_status, DROPPED, VERSION]
    if (
        done
        and client.is_connected()
        and not edge.unsubscribe(client, wanted, timeout=10, loop=loop)
    ):
        log.warning("aggregator.unsubscribe_unacknowledged")
    deadline = time.monotonic() + LEAVE_SECONDS  # and never on a broker that is gone
    while client.is_connected() and not (
        outbox.flush(timeout=0.2)
        if loop is None
        else loop.wait_for(lambda: not outbox.unacknowledged, 0.2)
    ):
        if time.monotonic() > deadline:
            break
    if outbox.unacknowledged:
        log.warning("aggregator.unacknowledged", messages=outbox.unacknowledged)
    if loop is None:
        edge.stop(client)
    else:
        loop.stop()


def run(config: AggregatorSettings, stop: threading.Event) -> int:
    """Run rounds until the last one closes (exit 0) or ``stop`` is set (exit 130).

    Holds a lock on the state directory meanwhile (``DirectoryLocked`` if another process
    has it); raises ``LoginRefused`` if the broker refuses the login for good."""
    if config.save_model is not None:
        problem = save_problem(config.save_model)
        if problem is not None:
            raise ValueError(f"--save-model {config.save_model}: {problem}")
    lock = lock_directory(config.state_dir) if config.state_dir is not None else None
    try:
        return _run(config, stop)
    finally:
        if lock is not None:
            lock.release()


def _run(config: AggregatorSettings, stop: threading.Event) -> int:
    topics = Topics(config.federation)
    # paho's network loop runs in this thread (edge.Loop): what it receives goes into a
    # plain list, handled here in batches of at most 4,096 read at a time; no second thread to hand
    # over to, and none to wait for (bench/README.md, third pass).
    inbox = edge.Batch()
    ready = threading.Event()
    offline = ServerStatus(
        federation=config.federation,
        state="offline",
        round=0,
        expected_nodes=config.nodes,
        min_nodes=round_policy(config).min_nodes,
        reported=0,
    )
    structlog.contextvars.bind_contextvars(federation=config.federation, role="aggregator")
    store = StateDir(config.state_dir) if config.state_dir is not None else None
    if store is not None and config.fresh:
        store.clear()
    client = edge.make_client(
        edge.make_client_id(config.federation, "aggregator"),
        subscriptions=[(topics.all_updates, 1), (topics.all_status, 1), (DROPPED, 0), (VERSION, 0)],
        will=(topics.server, encode(offline)),
        inbox=inbox,
        ready=ready,
        persistent=store is not None,  # the broker queues updates while we restart
        manual_ack=True,
    )
    loop = edge.Loop(client, inbox)
    outbox = edge.Outbox(client)
    publish = make_publish(outbox, topics)
    if config.save_model is not None:
        publish = saving_model(publish, topics.global_model, config.save_model)
    drops = BrokerDrops()  # fed from $SYS below, counted per round in the metrics
    aggregator = build_aggregator(config, publish, store, broker_drops=drops)
    # A CheckpointError goes up to the command: one line on stderr, exit status 2.
    resumed = resume_or_start(aggregator, store, rollback_to=config.rollback_to)
    loop.start(config.broker)
    while not ready.is_set():
        loop.run(0.2)
        edge.check(client)
        if stop.is_set():
            loop.stop()
            return 130
    if resumed:
        aggregator.republish()
        aggregator.tick()  # the journal may already hold the whole round
    else:
        aggregator.start()
    connects = 0
    progress = ProgressLine()
    # Asynchronous mode makes a version from every update of a received batch once the
    # buffer holds K (aggregator.buffer); rounds take exactly their nodes' updates.
    batched = config.mode == "async"
    updates = topics.prefix + "/updates/"
    # After the final model the loop goes on until its delivery is counted (``finished``).
    while not aggregator.finished and not stop.is_set():
        edge.check(client)
        progress.show(progress_text(aggregator))
        timeout = aggregator.timeout()
        if not inbox:  # else handle what came while connecting or publishing first
            loop.run(0.5 if timeout is None else min(timeout, 0.5), limit=4096)
        batch = loop.take()
        if not batch:
            aggregator.tick()
            continue
        for received in batch:
            if received.topic.startswith(updates):
                if batched:
                    aggregator.ingest(received.topic, received.payload)
                else:
                    aggregator.handle(received.topic, received.payload)
            elif received.topic == edge.CONNECTED:
                connects += 1
                if connects > 1:  # a reconnect, not the connect that preceded start()
                    aggregator.republish()
            elif received.topic.startswith(topics.prefix + "/status/"):
                node_id = topics.node_of(received.topic)
                if node_id is not None:
                    note_presence(aggregator, node_id, received.payload)
            elif received.topic == DROPPED:
                count = parse_counter(received.payload)
                if count is not None:
                    drops.note(count)
            elif received.topic == VERSION:  # sent after the counter, if it had one to send
                if counts_drops(received.payload):  # mosquitto; another broker may not count
                    drops.note_unchanged()
            else:
                # a topic we never subscribed to (amqtt was seen to deliver one): not an
                # update, so not counted as a rejected one
                log.warning("message.unexpected", topic=received.topic[:200])
        if batched or aggregator.done:  # a version, or the end of the final model's count
            aggregator.tick()
        if store is not None:
            store.sync()  # group commit: one fsync for the batch, before its PUBACKs
        edge.acknowledge_all(client, batch)
    progress.close()
    aggregator.finish()  # a stop cuts the final model's count short: what it has so far
    if config.report is not None:
        write_report(
            config.report,
            build_report(
                aggregator.history,
                federation=config.federation,
                model=aggregator.settings.model_name,
                **proximal_mu_entry(aggregator.settings.plan.proximal_mu),
                **dp_sgd_entry(config.dp_sgd),
                **({} if config.dp_fedavg is None else {"dp_fedavg": config.dp_fedavg}),
                **mode_entry(
                    config.mode, config.buffer_size, config.staleness, config.max_staleness
                ),
                **final_delivery_entry(aggregator.final_count),
            ),
        )
    if not aggregator.done:
        publish(topics.server, encode(aggregator.server_status("offline")), True)
    leave(client, outbox, topics, done=aggregator.done, loop=loop)
    if store is not None:
        store.close()
    log.info("aggregator.finished", rounds=len(aggregator.history), stopped=stop.is_set())
    return 0 if aggregator.done else 130
