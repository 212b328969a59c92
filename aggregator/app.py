"""The aggregator process: config in, MQTT loop around ``Aggregator``, report out."""

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from aggregator.rounds import RoundPolicy
from aggregator.server import Aggregator, Publish, RoundSettings, dense_update_bound
from fedmq import mqtt as edge
from fedmq.compression import parse_spec
from fedmq.datasets import Dataset, digits, load_npz
from fedmq.models import get_model
from fedmq.report import build_report, write_report
from schemas import ServerStatus, Topics, TrainingPlan, encode

log = structlog.get_logger()


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    broker: edge.BrokerAddress
    federation: str
    model: str = "digits-mlp"
    rounds: int = 30
    nodes: int = 10
    min_nodes: int | None = None
    round_timeout: float | None = None
    learning_rate: float = 0.1
    batch_size: int = 16
    local_epochs: int = 1
    seed: int = 0
    compression: str = "dense"
    test_data: str | None = "digits"  # "digits", a path to an .npz, or None
    max_update_bytes: int | None = None
    report: Path | None = None


def load_test_set(spec: str | None) -> Dataset | None:
    if spec is None:
        return None
    if spec == "digits":
        return digits()[1]
    return load_npz(Path(spec))


def build_aggregator(config: AggregatorConfig, publish: Publish) -> Aggregator:
    model = get_model(config.model)
    settings = RoundSettings(
        federation=config.federation,
        model_name=config.model,
        model=model,
        rounds=config.rounds,
        policy=RoundPolicy(
            expected_nodes=config.nodes,
            min_nodes=config.min_nodes if config.min_nodes is not None else config.nodes,
            deadline_seconds=config.round_timeout,
        ),
        plan=TrainingPlan(
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            local_epochs=config.local_epochs,
            seed=config.seed,
            compression=str(parse_spec(config.compression)),
        ),
        max_update_bytes=config.max_update_bytes or dense_update_bound(model),
    )
    return Aggregator(
        settings, model.init(config.seed), publish=publish, test=load_test_set(config.test_data)
    )


def run(config: AggregatorConfig, stop: threading.Event) -> int:
    """Run rounds until the last one closes (exit 0) or ``stop`` is set (exit 130)."""
    topics = Topics(config.federation)
    inbox: queue.Queue[edge.Received] = queue.Queue()
    ready = threading.Event()
    offline = ServerStatus(
        federation=config.federation,
        state="offline",
        round=0,
        expected_nodes=config.nodes,
        min_nodes=config.min_nodes or config.nodes,
        reported=0,
    )
    client = edge.make_client(
        edge.make_client_id(config.federation, "aggregator"),
        subscriptions=[(topics.all_updates, 1)],
        will=(topics.server, encode(offline)),
        inbox=inbox,
        ready=ready,
    )
    outbox = edge.Outbox(client)

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        outbox.publish(topic, payload, retain=retain)

    aggregator = build_aggregator(config, publish)
    structlog.contextvars.bind_contextvars(federation=config.federation, role="aggregator")
    edge.start(client, config.broker)
    while not ready.wait(0.2):
        if stop.is_set():
            edge.stop(client)
            return 130
    aggregator.start()
    connects = 0
    while not aggregator.done and not stop.is_set():
        timeout = aggregator.timeout()
        try:
            received = inbox.get(timeout=0.5 if timeout is None else min(timeout, 0.5))
        except queue.Empty:
            aggregator.tick()
            continue
        if received.topic == edge.CONNECTED:
            connects += 1
            if connects > 1:  # a reconnect, not the connect that preceded start()
                aggregator.republish()
        else:
            aggregator.handle(received.topic, received.payload)
    if config.report is not None:
        write_report(
            config.report,
            build_report(aggregator.history, federation=config.federation, model=config.model),
        )
    if not aggregator.done:
        publish(topics.server, encode(aggregator.server_status("offline")), True)
    if not outbox.flush(timeout=10):
        log.warning("aggregator.unacknowledged", messages=outbox.unacknowledged)
    edge.stop(client)
    log.info("aggregator.finished", rounds=len(aggregator.history), stopped=stop.is_set())
    return 0 if aggregator.done else 130
