"""``fedmq.netloop``: one thread drives many clients against a real mosquitto. Publishes
from another thread leave at once (the loop is woken to write), a broker restart is
survived with each client's own back-off, and a stop does not wait for a dead broker."""

import queue
import threading
import time

import pytest

from fedmq import mqtt as edge
from fedmq.broker.process import Mosquitto
from fedmq.netloop import NetworkLoop

from ..conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLIENTS = 20


def _clients(inbox: "queue.Queue[tuple[int, edge.Received]]", prefix: str, topic: str):  # type: ignore[no-untyped-def]
    class Tag:
        def __init__(self, index: int) -> None:
            self.index = index

        def put(
            self, item: edge.Received, /, block: bool = True, timeout: float | None = None
        ) -> None:
            inbox.put((self.index, item), block, timeout)

    readies = [threading.Event() for _ in range(CLIENTS)]
    clients = [
        edge.make_client(
            f"{prefix}-{i}", subscriptions=[(topic, 1)], inbox=Tag(i), ready=readies[i]
        )
        for i in range(CLIENTS)
    ]
    return clients, readies


def _connects(inbox: "queue.Queue[tuple[int, edge.Received]]") -> list[int]:
    seen = []
    while True:
        try:
            index, received = inbox.get_nowait()
        except queue.Empty:
            return seen
        if received.topic == edge.CONNECTED:
            seen.append(index)


def test_many_clients_on_one_thread_publish_receive_and_survive_a_broker_restart(
    tmp_path, federation
):
    broker = Mosquitto(data_dir=tmp_path / "broker").start()
    address = edge.BrokerAddress.parse(broker.address)
    topic = f"t/{federation}/echo"
    inbox: queue.Queue[tuple[int, edge.Received]] = queue.Queue()
    clients, readies = _clients(inbox, federation, topic)
    network = NetworkLoop().start()
    before = threading.active_count()
    try:
        for client in clients:
            edge.start(client, address, network=network)
        assert all(ready.wait(10) for ready in readies)
        assert threading.active_count() == before  # no thread per client
        assert sorted(_connects(inbox)) == list(range(CLIENTS))

        # published from this thread, not the loop's: each leaves and is acknowledged
        outboxes = [edge.Outbox(client) for client in clients]
        started = time.monotonic()
        for i, outbox in enumerate(outboxes):
            outbox.publish(topic, f"{i}".encode())
        assert all(outbox.flush(timeout=5) for outbox in outboxes)
        assert time.monotonic() - started < 2
        wait_until(lambda: inbox.qsize() >= CLIENTS * CLIENTS, 10, "every client's echo")

        for readiness in readies:
            readiness.clear()
        broker.kill()
        wait_until(lambda: not any(c.is_connected() for c in clients), 10, "all to see the loss")
        broker.start()
        assert all(ready.wait(30) for ready in readies), [c.is_connected() for c in clients]
        assert sorted(_connects(inbox)) == list(range(CLIENTS))  # each reconnected once

        started = time.monotonic()
        for client in clients:
            edge.stop(client)
        assert time.monotonic() - started < 5
        assert not any(client.is_connected() for client in clients)
    finally:
        network.close()
        broker.stop()


def test_a_stop_does_not_wait_for_a_broker_that_is_gone(tmp_path, federation):
    broker = Mosquitto(data_dir=tmp_path / "broker").start()
    address = edge.BrokerAddress.parse(broker.address)
    ready = threading.Event()
    client = edge.make_client(f"{federation}-gone", ready=ready)
    network = NetworkLoop().start()
    try:
        edge.start(client, address, network=network)
        assert ready.wait(10)
        broker.kill()
        wait_until(lambda: not client.is_connected(), 10, "the loss")
        started = time.monotonic()
        edge.stop(client)
        assert time.monotonic() - started < 1
    finally:
        network.close()
        broker.stop()


def test_a_callback_that_raises_does_not_stop_the_other_clients(tmp_path, federation):
    from structlog.testing import capture_logs

    broker = Mosquitto(data_dir=tmp_path / "broker").start()
    address = edge.BrokerAddress.parse(broker.address)
    topic = f"t/{federation}/raise"
    inbox: queue.Queue[tuple[int, edge.Received]] = queue.Queue()
    clients, readies = _clients(inbox, federation, topic)
    broken, healthy = clients[0], clients[1:]

    def on_message(*_args: object) -> None:
        raise RuntimeError("a bug in a callback")

    broken.on_message = on_message
    network = NetworkLoop().start()
    try:
        with capture_logs() as logs:
            for client in clients:
                edge.start(client, address, network=network)
            assert all(ready.wait(10) for ready in readies)
            for round_trip in range(2):
                edge.Outbox(healthy[0]).publish(topic, f"{round_trip}".encode())
                wait_until(
                    lambda n=round_trip + 1: sum(r.topic == topic for _, r in list(inbox.queue)) >= len(healthy) * n,
                    10, "the healthy clients' copies",
                )  # fmt: skip
        assert any(e["event"] == "mqtt.callback_failed" for e in logs), logs
        assert broken.is_connected()
        for client in clients:
            edge.stop(client)
    finally:
        network.close()
        broker.stop()
