"""``metrics.broker_dropped`` on a broker that has been up for minutes (issue 11: an
aggregator started on such a broker reported nil every round).

mosquitto 2.0 publishes ``$SYS/broker/publish/messages/dropped`` retained with a 60 s
message expiry, and again only when the value changes (src/sys_tree.c): a subscriber
that comes later than a minute after the last change gets nothing. This test watches the
retained copy expire on a real broker, then runs a federation on it.
"""

import threading
import time
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from fedmq.broker.process import Mosquitto
from fedmq.schemas import Topics, decode_metrics
from fedmq.schemas.sys_topics import DROPPED, VERSION

from ..conftest import Collector, through

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    """A broker of our own, so that its age and its counter are ours."""
    with Mosquitto() as started:
        yield started


def sys_on_subscribe(broker: Mosquitto) -> list[str]:
    """The $SYS topics a new subscriber to the counter, then the version, gets, in order."""
    got: list[str] = []
    version = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(message.topic)
        if message.topic == VERSION:
            version.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    client.on_connect = lambda c, *_: c.subscribe([(DROPPED, 0), (VERSION, 0)])
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert version.wait(10), "no $SYS/broker/version"
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_a_broker_up_for_minutes_still_gives_a_reading(broker, spawn, node_data, tmp_path):
    started = time.monotonic()
    while sys_on_subscribe(broker) == []:  # until the first $SYS tick
        time.sleep(0.2)
    assert sys_on_subscribe(broker) == [DROPPED, VERSION]  # the counter first, then version
    while DROPPED in sys_on_subscribe(broker):  # the retained counter expires after 60 s
        assert time.monotonic() - started < 130, "the retained counter did not expire"
        time.sleep(5)
    assert time.monotonic() - started >= 55
    assert sys_on_subscribe(broker) == [VERSION]

    federation = f"t-{uuid.uuid4().hex[:12]}"
    topics = Topics(federation)
    watcher = Collector((broker.host, broker.port), [topics.metrics])
    try:
        common = ["--broker", broker.address, "--federation", federation, "--log-json"]
        aggregator = spawn(
            "aggregator", "aggregator", *common, "--nodes", "1", "--rounds", "2",
            "--state-dir", str(tmp_path / "aggregator"),
        )  # fmt: skip
        [data] = node_data(1)
        node = spawn(
            "node", "node", *common, "--node-id", "pi-1", "--data", str(data),
            "--state-dir", str(tmp_path / "node"), "--exit-when-done",
        )  # fmt: skip
        assert aggregator.wait(240) == 0, aggregator.log()
        assert node.wait(60) == 0, node.log()
        # the exits say the broker had the metrics; the watcher's copy may still be on its way
        metrics = [
            decode_metrics(p) for p in watcher.wait_on(topics.metrics, through(2), "metrics")
        ]
    finally:
        watcher.close()
    assert [m.round for m in metrics] == [1, 2]
    assert [m.broker_dropped for m in metrics] == [0, 0]
