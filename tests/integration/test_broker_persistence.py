"""mosquitto.conf's persistence, with raw paho clients: the retained global model and a
persistent session's queued QoS 1 messages survive a clean restart of the broker and a
new broker process on the same data directory and port; after SIGKILL the broker comes
back with what it had saved."""

import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedmq.broker.process import Mosquitto

pytestmark = [pytest.mark.integration]


class Client:
    """A raw paho client that keeps what it receives."""

    def __init__(self, broker: Mosquitto, client_id: str, *, clean: bool, topic: str) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self._got = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
        self.client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._got:
            self.received.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._got.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes, bool]]:
        with self._got:
            self._got.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker: Mosquitto, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_retained_and_queued_messages_survive_restarts(tmp_path: Path):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "broker-data"
    broker = Mosquitto(data_dir=data).start()
    try:
        publish(broker, f"{prefix}/global", b"model 1", retain=True)
        # A persistent session subscribes, goes away, and misses two QoS 1 messages.
        away = Client(broker, f"{prefix}-agg", clean=False, topic=f"{prefix}/updates/+")
        away.close()
        publish(broker, f"{prefix}/updates/a", b"update a")
        broker.restart()  # SIGTERM: mosquitto saves its database
        assert broker.persistence_path.exists()
        publish(broker, f"{prefix}/updates/b", b"update b")

        # A new broker process on the same data directory and port.
        port = broker.port
        broker.stop()
        assert data.joinpath("mosquitto.db").exists()  # data_dir is ours: not removed
        broker = Mosquitto(port=port, data_dir=data).start()

        late = Client(broker, f"{prefix}-late", clean=True, topic=f"{prefix}/global")
        assert late.wait_for(1) == [(f"{prefix}/global", b"model 1", True)]
        late.close()
        back = Client(broker, f"{prefix}-agg", clean=False, topic=f"{prefix}/updates/+")
        assert back.wait_for(2) == [
            (f"{prefix}/updates/a", b"update a", False),
            (f"{prefix}/updates/b", b"update b", False),
        ]
        back.close()
    finally:
        broker.stop()


def test_a_killed_broker_comes_back_with_its_last_save():
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    broker = Mosquitto().start()  # no data_dir: a temporary one, kept until stop()
    try:
        publish(broker, f"{prefix}/global", b"saved", retain=True)
        broker.restart()  # saved on the way out
        publish(broker, f"{prefix}/global", b"not saved", retain=True)
        pid = broker.pid
        broker.kill()  # SIGKILL: the change since the last save is gone
        assert broker.pid is None
        broker.start()
        assert broker.pid != pid
        reader = Client(broker, f"{prefix}-r", clean=True, topic=f"{prefix}/global")
        assert reader.wait_for(1) == [(f"{prefix}/global", b"saved", True)]
        reader.close()
    finally:
        workdir = broker.log_path.parent
        broker.stop()
    assert not workdir.exists()  # stop() removes the temporary directory it made
