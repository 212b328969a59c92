"""The two MQTT moves a node's downlink rests on (docs/PROTOCOL.md section 3), against a
real mosquitto: after a connect, the acknowledgement of the ``settle`` unsubscribe comes
after the retained messages of the subscriptions; ``fetch_retained`` brings a topic's
retained message once and nothing published there later."""

import queue

import paho.mqtt.client as mqtt
import pytest

from fedmq import mqtt as edge

from ..conftest import wait_until

pytestmark = pytest.mark.integration


def publish_retained(address: edge.BrokerAddress, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def take(inbox: "queue.Queue[edge.Received]", count: int) -> list[edge.Received]:
    return [inbox.get(timeout=10) for _ in range(count)]


def test_settle_comes_after_the_retained_compact_form_and_a_fetch_takes_one_copy(
    mosquitto, federation
):
    address = edge.BrokerAddress.parse(mosquitto.address)
    compact, full = f"fedmq/{federation}/global/delta", f"fedmq/{federation}/global"
    publish_retained(address, compact, b"compact-1" * 100)
    publish_retained(address, full, b"full-1" * 10_000)
    inbox: queue.Queue[edge.Received] = queue.Queue()
    client = edge.make_client(
        edge.make_client_id(federation, "node", "probe"),
        subscriptions=[(compact, 0)],
        settle=[full],
        inbox=inbox,
    )
    edge.start(client, address)
    try:
        got = take(inbox, 3)
        assert [(r.topic, r.retain) for r in got] == [
            (edge.CONNECTED, False),
            (compact, True),
            (edge.SETTLED, False),
        ]
        assert got[2].payload == b"connect"
        assert edge.fetch_retained(client, full)
        got = take(inbox, 2)
        assert [(r.topic, r.payload[:6], r.retain) for r in got] == [
            (full, b"full-1", True),
            (edge.SETTLED, b"fetch", False),
        ]
        publish_retained(address, full, b"full-2")  # not subscribed any more: not sent
        publish_retained(address, compact, b"compact-2")  # subscribed: sent
        wait_until(lambda: not inbox.empty(), 10, "the live compact form")
        live = inbox.get(timeout=1)
        assert (live.topic, live.payload, live.retain) == (compact, b"compact-2", False)
        assert inbox.empty()
    finally:
        edge.stop(client)
