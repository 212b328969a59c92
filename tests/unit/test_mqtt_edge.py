"""The MQTT edge's pure parts: broker addresses, credentials, reconnect jitter, draining."""

import queue
import ssl
from pathlib import Path

import pytest

from fedmq import mqtt as edge
from fedmq.cli import main


def test_broker_address_parses_and_prints() -> None:
    assert edge.BrokerAddress.parse("10.0.0.2:8883") == edge.BrokerAddress("10.0.0.2", 8883)
    assert edge.BrokerAddress.parse("broker.local").port == 1883
    with_tls = edge.BrokerAddress("h", 8883, edge.Credentials(ca_file=Path("/ca.pem")))
    assert str(with_tls) == "h:8883 (TLS)"
    for bad in ("h:0", "h:x", ":1883", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            edge.BrokerAddress.parse(bad)


def test_credentials_problems_name_the_setting(tmp_path: Path) -> None:
    existing = tmp_path / "f"
    existing.write_text("secret\n")
    assert edge.Credentials().problem() is None
    assert edge.Credentials(username="pi-01", password_file=existing).problem() is None
    assert "needs a username" in (edge.Credentials(password_file=existing).problem() or "")
    assert "needs its key" in (
        edge.Credentials(ca_file=existing, cert_file=existing).problem() or ""
    )
    assert "needs TLS" in (edge.Credentials(cert_file=existing, key_file=existing).problem() or "")
    missing = edge.Credentials(username="u", password_file=tmp_path / "nope")
    assert missing.problem() == f"password file {tmp_path / 'nope'} does not exist"


def test_the_password_is_the_first_line_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("s3cret\nignored\n")
    assert edge.Credentials(username="u", password_file=path).password() == "s3cret"
    assert edge.Credentials(username="u").password() is None


def test_no_ca_means_no_tls_and_a_ca_means_verified_tls_1_2_or_newer(tmp_path: Path) -> None:
    assert edge.Credentials().tls_context() is None
    ca = Path(ssl.get_default_verify_paths().cafile or "")
    if not ca.is_file():
        pytest.skip("no system CA bundle to load as a stand-in CA file")
    context = edge.Credentials(ca_file=ca).tls_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_the_cli_refuses_unusable_credentials_before_connecting(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["monitor", "--password-file", str(tmp_path / "missing"), "--username", "m"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmq monitor: error: broker credentials: password file")


def test_reconnect_delays_are_jittered() -> None:
    delays = {edge._jittered(1.0) for _ in range(50)}
    assert len(delays) > 40 and all(0.5 <= d <= 1.5 for d in delays)


def test_drain_takes_what_is_queued_up_to_a_limit() -> None:
    inbox: queue.Queue[edge.Received] = queue.Queue()
    for i in range(5):
        inbox.put(edge.Received(f"t{i}", b"", False))
    first = edge.Received("first", b"", False)
    assert [r.topic for r in edge.drain(inbox, first, limit=3)] == ["first", "t0", "t1"]
    assert [r.topic for r in edge.drain(inbox, first)] == ["first", "t2", "t3", "t4"]


class _Info:
    def __init__(self, mid: int, rc: int = 0) -> None:
        self.mid, self.rc = mid, rc


class _FakeClient:
    """Stands for paho: numbers publishes, calls on_publish when told to."""

    def __init__(self) -> None:
        self.on_publish = None
        self.mid = 0
        self.early: set[int] = set()  # mids whose on_publish comes before publish returns
        self.connected = True

    def publish(self, _topic: str, _payload: bytes, *, qos: int, retain: bool) -> _Info:
        self.mid += 1
        if qos == 0 and not self.connected:
            return _Info(self.mid, rc=4)  # MQTT_ERR_NO_CONN: dropped
        if self.mid in self.early:
            self.done(self.mid)
        return _Info(self.mid)

    def done(self, mid: int) -> None:
        self.on_publish(self, None, mid, 0, None)  # type: ignore[misc]


def test_the_outbox_waits_for_qos_1_only() -> None:
    from fedmq.mqtt import Outbox

    client = _FakeClient()
    client.early = {2}
    outbox = Outbox(client)  # type: ignore[arg-type]
    outbox.publish("global", b"m", retain=True, qos=0)  # mid 1, written later
    outbox.publish("global/delta", b"d", qos=0)  # mid 2, written before publish returned
    outbox.publish("server", b"s", retain=True)  # mid 3, QoS 1
    assert outbox.unacknowledged == 1 and not outbox.flush(timeout=0)
    client.done(1)
    assert outbox.unacknowledged == 1  # a QoS 0 write is no PUBACK
    client.done(3)
    assert outbox.flush(timeout=0)
    client.connected = False
    outbox.publish("global", b"m", qos=0)  # dropped by paho: nothing to wait for
    assert outbox.flush(timeout=0)
    assert outbox._acked_early == set() and outbox._unsent == set()


def test_a_batch_is_acknowledged_in_one_write_of_the_same_pubacks() -> None:
    """``acknowledge_all`` queues the PUBACKs of a batch (QoS 1, in order; none for QoS 0)
    as one write, byte for byte what paho's ``ack`` of each would have sent."""
    batch = [
        edge.Received("fedmq/t/updates/a", b"x", False, mid=5, qos=1),
        edge.Received("fedmq/t/status/a", b"y", True, mid=0, qos=0),
        edge.Received("fedmq/t/updates/b", b"z", False, mid=300, qos=1),
    ]
    ours = edge.make_client("fedmq:t:aggregator", manual_ack=True)
    edge.acknowledge_all(ours, batch)
    paho = edge.make_client("fedmq:t:aggregator", manual_ack=True)
    for received in batch:
        if received.qos:
            paho.ack(received.mid, received.qos)
    written = [bytes(packet["packet"]) for packet in ours._out_packet]
    assert written == [b"".join(bytes(packet["packet"]) for packet in paho._out_packet)]
    assert written == [b"\x40\x02\x00\x05\x40\x02\x01\x2c"]
    automatic = edge.make_client("fedmq:t:node")  # paho acknowledged these itself
    edge.acknowledge_all(automatic, batch)
    assert not automatic._out_packet
