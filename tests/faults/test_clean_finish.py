"""A finished run always leaves ``done`` on the retained server topic (issue 11: in 2 of
13 runs the aggregator's last will, ``offline`` round 0, replaced it), and a finished
node ``done`` on its status topic.

mosquitto publishes a client's will when the connection ends without a DISCONNECT it has
read. mosquitto 2.0 writes to a writable socket before reading it (src/mux_epoll.c): if
the client closed its socket with messages still unread in it, its kernel answers with a
reset, the broker's next write fails and it drops the connection as lost, the DISCONNECT
unread behind it. Status messages go on arriving while an aggregator shuts down. Here the
aggregator's own shutdown (``aggregator.app.leave``) runs many times on a real broker,
with a client publishing on ``status/`` all along; a fresh subscriber reads the retained
``server`` after each.
"""

import queue
import threading
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from fedmq import mqtt as edge
from fedmq.aggregator.app import leave, make_publish
from fedmq.broker.process import Mosquitto
from fedmq.node.app import leave as node_leave
from fedmq.schemas import (
    NodeStatus,
    ServerStatus,
    Topics,
    decode_server_status,
    decode_status,
    encode,
)
from fedmq.schemas.sys_topics import DROPPED, VERSION

from ..conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RUNS = 30


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    """A broker of our own: the chatter below would slow the session's broker."""
    with Mosquitto() as started:
        yield started


BACKLOG = 500  # publishes of 20 kB: 10 MB


class Chatter:
    """Publishes unreadable messages as fast as the broker takes them, until closed:
    traffic the aggregator (or node) receives while it shuts down (it ignores them).

    paho queues QoS 0 publishes in memory without limit (a CI run's pytest grew to 24 GB
    and was OOM-killed), so the chatter waits while paho holds more than BACKLOG of them
    (its private ``_out_packet``: paho has no public count). It stays a QoS 0 flood with
    a backlog: paced by PUBACKs (QoS 1) or by an empty send queue, it no longer made the
    old shutdown lose ``done``."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(topic,), daemon=True)
        self._thread.start()

    def _run(self, topic: str) -> None:
        while not self._stop.is_set():
            if len(self.client._out_packet) > BACKLOG:
                self._stop.wait(0.001)
            elif self.client.publish(topic, b"x" * 20_000, qos=0).rc != mqtt.MQTT_ERR_SUCCESS:
                self._stop.wait(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker: Mosquitto, topic: str) -> bytes:
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    client.on_connect = lambda c, *_: c.subscribe(topic, 1)
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload)) if m.retain else None
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        wait_until(lambda: bool(got), 10, f"the retained {topic}")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def finish_once(broker: Mosquitto, topics: Topics, *, one_thread: bool = False) -> None:
    """Connect as the aggregator does, publish ``done`` and leave as it does; with
    ``one_thread`` paho's network loop runs in this thread (``edge.Loop``), as in the
    aggregator, else on paho's own thread (``edge.start``)."""

    def status(state: str, round_: int) -> bytes:
        return encode(ServerStatus(topics.federation, state, round_, 1, 1, 0))

    inbox = edge.Batch()
    threaded: queue.Queue[edge.Received] = queue.Queue()
    ready = threading.Event()
    client = edge.make_client(
        edge.make_client_id(topics.federation, "aggregator"),
        subscriptions=[(topics.all_updates, 1), (topics.all_status, 1), (DROPPED, 0), (VERSION, 0)],
        will=(topics.server, status("offline", 0)),
        inbox=inbox if one_thread else threaded,
        ready=ready,
        persistent=True,
        manual_ack=True,
    )
    outbox = edge.Outbox(client)
    address = edge.BrokerAddress(broker.host, broker.port)
    if one_thread:
        loop = edge.Loop(client, inbox)
        loop.start(address)
        assert loop.wait_for(lambda: len(inbox) > 20, 10), "status messages flowing in"
        assert ready.is_set()
        make_publish(outbox, topics)(topics.server, status("done", 2), True)
        leave(client, outbox, topics, done=True, loop=loop)
        return
    edge.start(client, address)
    assert ready.wait(10)
    wait_until(lambda: threaded.qsize() > 20, 10, "status messages flowing in")
    make_publish(outbox, topics)(topics.server, status("done", 2), True)
    leave(client, outbox, topics, done=True)


@pytest.mark.parametrize("one_thread", [False, True], ids=["paho-thread", "one-thread"])
def test_a_finished_run_always_leaves_done(broker: Mosquitto, one_thread: bool):
    topics = Topics(f"t-{uuid.uuid4().hex[:12]}")
    chatter = Chatter(broker, topics.status("chatty"))
    states = []
    try:
        for _ in range(RUNS):
            finish_once(broker, topics, one_thread=one_thread)
            status = decode_server_status(retained(broker, topics.server))
            states.append((status.state, status.round))
    finally:
        chatter.close()
    assert states == [("done", 2)] * RUNS


def node_finish_once(broker: Mosquitto, topics: Topics) -> None:
    """Connect as a node does, publish ``done`` and leave as it does, while global models
    arrive (the chatter publishes on the node's global/delta topic)."""
    offline = NodeStatus(federation=topics.federation, node_id="pi-01", state="offline")
    inbox: queue.Queue[edge.Received] = queue.Queue()
    ready = threading.Event()
    client = edge.make_client(
        edge.make_client_id(topics.federation, "node", "pi-01"),
        subscriptions=[(topics.global_model, 0), (topics.global_delta, 0)],
        will=(topics.status("pi-01"), encode(offline)),
        inbox=inbox,
        ready=ready,
        persistent=True,
    )
    outbox = edge.Outbox(client)
    edge.start(client, edge.BrokerAddress(broker.host, broker.port))
    assert ready.wait(10)
    wait_until(lambda: inbox.qsize() > 20, 10, "global models flowing in")
    done = NodeStatus(federation=topics.federation, node_id="pi-01", state="done", round=3)
    outbox.publish(topics.status("pi-01"), encode(done), retain=True)
    node_leave(client, outbox, topics)


def test_a_finished_node_always_leaves_done(broker: Mosquitto):
    topics = Topics(f"t-{uuid.uuid4().hex[:12]}")
    chatter = Chatter(broker, topics.global_delta)
    states = []
    try:
        for _ in range(RUNS):
            node_finish_once(broker, topics)
            status = decode_status(retained(broker, topics.status("pi-01")))
            states.append((status.state, status.round))
    finally:
        chatter.close()
    assert states == [("done", 3)] * RUNS
