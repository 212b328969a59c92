"""The site aggregator process (``fedmq aggregator --site NAME --upstream HOST:PORT``):
two MQTT connections around ``SiteAggregator`` (docs/hierarchy.md).

On the site broker (``--broker``): a persistent session that reads the root's global
model (bridged in by mosquitto) and the site's nodes' updates, acknowledging each update
(PUBACK) only after the journal holding it was fsynced, as the root aggregator does
(``aggregator.app``); the round metrics go out here. On the root's broker
(``--upstream``): the site's update, QoS 1, and the site's retained status under its
node id, with a last will, as a node's. After a restart or a reconnect to the root the
open round's update, if it was sent, is sent again; the root keeps one per site and round.
"""

import queue
import threading
import time

import structlog

from fedmq import mqtt as edge
from fedmq.aggregator.app import LEAVE_SECONDS, aggregation_rule
from fedmq.aggregator.checkpoint import StateDir
from fedmq.aggregator.rounds import RoundPolicy, default_quorum
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.aggregator.site_server import SiteAggregator, SiteSettings
from fedmq.compression import parse_spec
from fedmq.files import lock_directory
from fedmq.progress_line import ProgressLine
from fedmq.report import build_report, write_report
from fedmq.schemas import NodeStatus, Topics, encode

log = structlog.get_logger()


def site_settings(config: AggregatorSettings) -> SiteSettings:
    """The site's settings from ``fedmq aggregator --site``'s; ValueError (one line) if
    they cannot work."""
    assert config.site is not None
    return SiteSettings(
        federation=config.federation,
        site=config.site,
        policy=RoundPolicy(
            expected_nodes=config.nodes,
            min_nodes=config.min_nodes
            if config.min_nodes is not None
            else default_quorum(config.nodes),
            deadline_seconds=config.round_timeout,
        ),
        aggregation=aggregation_rule(config),  # refuses what cannot be split (--site)
        upstream=parse_spec(config.upstream_compression),
        known_nodes=frozenset(config.node_ids) if config.node_ids is not None else None,
        max_update_bytes=config.max_update_bytes,
    )


def run(config: AggregatorSettings, stop: threading.Event) -> int:
    """Stand for the site until the root's final model arrives (exit 0) or ``stop`` is
    set (exit 130). Holds a lock on the state directory meanwhile."""
    settings = site_settings(config)  # refused before anything is locked or connected
    upstream = config.upstream_broker
    assert upstream is not None
    lock = lock_directory(config.state_dir) if config.state_dir is not None else None
    try:
        return _run(config, settings, upstream, stop)
    finally:
        if lock is not None:
            lock.release()


def _run(
    config: AggregatorSettings,
    settings: SiteSettings,
    upstream: edge.BrokerAddress,
    stop: threading.Event,
) -> int:
    topics = Topics(config.federation)
    site = settings.site
    structlog.contextvars.bind_contextvars(federation=config.federation, role="site", site=site)
    store = StateDir(config.state_dir) if config.state_dir is not None else None
    if store is not None and config.fresh:
        store.clear()
    inbox: queue.Queue[edge.Received] = queue.Queue()
    ready = threading.Event()
    local = edge.make_client(
        edge.make_client_id(config.federation, "site", site),
        subscriptions=[(topics.all_updates, 1), (topics.global_model, 0)],
        inbox=inbox,
        ready=ready,
        persistent=store is not None,  # the site broker queues updates while we restart
        manual_ack=True,
    )
    local_out = edge.Outbox(local)
    root_inbox: queue.Queue[edge.Received] = queue.Queue()
    offline = NodeStatus(federation=config.federation, node_id=site, state="offline")
    root = edge.make_client(
        edge.make_client_id(config.federation, "node", site),  # the site is a node there
        will=(topics.status(site), encode(offline)),
        inbox=root_inbox,
        persistent=True,
    )
    root_out = edge.Outbox(root)

    def status(state: str, round_: int) -> None:
        message = NodeStatus(
            federation=config.federation,
            node_id=site,
            state=state,
            round=round_ if round_ >= 1 else None,
            at=time.time(),
        )
        root_out.publish(topics.status(site), encode(message), retain=True)

    def send_upstream(payload: bytes) -> None:
        root_out.publish(topics.update(site), payload, qos=1)
        status("submitted", aggregator.round)

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        local_out.publish(topic, payload, retain=retain, qos=1)

    aggregator = SiteAggregator(settings, publish=publish, send_upstream=send_upstream, store=store)
    checkpoint = store.load() if store is not None else None
    if store is not None and checkpoint is not None:
        store.forget_after(checkpoint.version)
        store.open_journal(checkpoint.version)
        aggregator.resume(checkpoint, store.journal_records(checkpoint.version))
    edge.start(root, upstream)
    edge.start(local, config.broker)
    while not ready.wait(0.2):
        edge.check(local)
        edge.check(root)
        if stop.is_set():
            edge.stop(local)
            edge.stop(root)
            return 130
    log.info("site.started", broker=str(config.broker), upstream=str(upstream))
    if checkpoint is not None:  # resumed: the update may not have left before the crash
        aggregator.republish()
        aggregator.tick()  # the journal may already hold the whole round
    root_connects = 0
    early: list[edge.Received] = []  # updates for a root round not open here yet
    progress = ProgressLine()
    while not aggregator.done and not stop.is_set():
        edge.check(local)
        edge.check(root)
        while not root_inbox.empty():
            if root_inbox.get_nowait().topic == edge.CONNECTED:
                root_connects += 1
                status("waiting", aggregator.round)
                if root_connects > 1:  # a reconnect: the root may have missed our update
                    aggregator.republish()
        progress.show(
            f"site {site}, root round {aggregator.round}: {aggregator.reported}/{config.nodes} "
            + ("sent" if aggregator.sent else "reported")
        )
        timeout = aggregator.timeout()
        try:
            first = inbox.get(timeout=0.5 if timeout is None else min(timeout, 0.5))
        except queue.Empty:
            aggregator.tick()
            continue
        batch = edge.drain(inbox, first, limit=4096)
        opened = aggregator.round
        handled = []
        for received in batch:
            if received.topic == topics.global_model:
                aggregator.on_global(received.payload)
            elif received.topic.startswith(topics.prefix + "/updates/"):
                if not aggregator.handle(received.topic, received.payload):
                    early.append(received)  # its round's model first; no PUBACK until then
                    continue
            elif received.topic != edge.CONNECTED:
                log.warning("message.unexpected", topic=received.topic[:200])
            handled.append(received)
        if early and aggregator.round != opened:  # a new round: the updates that waited for it
            waiting, early = early, []
            for received in waiting:
                if aggregator.handle(received.topic, received.payload):
                    handled.append(received)
                else:
                    early.append(received)
        if store is not None:
            store.sync()  # group commit: one fsync for the batch, before its PUBACKs
        edge.acknowledge_all(local, handled)
    progress.close()
    if aggregator.done:
        status("done", aggregator.round - 1)
    if config.report is not None:
        write_report(
            config.report,
            build_report(aggregator.history, federation=config.federation, site=site),
        )
    _leave(local, local_out, topics, done=aggregator.done)
    _leave(root, root_out, topics, done=False)
    if store is not None:
        store.close()
    log.info("site.finished", rounds=len(aggregator.history), stopped=stop.is_set())
    return 0 if aggregator.done else 130


def _leave(client: edge.Client, outbox: edge.Outbox, topics: Topics, *, done: bool) -> None:
    """Wait for the broker's acknowledgements (``LEAVE_SECONDS`` at most), then disconnect;
    after a finished run first unsubscribe, so the session queues nothing more."""
    wanted = [topics.all_updates, topics.global_model]
    if done and client.is_connected() and not edge.unsubscribe(client, wanted, timeout=10):
        log.warning("site.unsubscribe_unacknowledged")
    deadline = time.monotonic() + LEAVE_SECONDS
    while client.is_connected() and not outbox.flush(timeout=0.2):
        if time.monotonic() > deadline:
            break
    if outbox.unacknowledged:
        log.warning("site.unacknowledged", messages=outbox.unacknowledged)
    edge.stop(client)
