"""A real mosquitto started with the files `fedmq broker init` generates (TLS listener and
loopback listener on free 127.0.0.1 ports), probed with raw paho clients: who may
connect, who may publish and read what, and revocation on a running broker."""

import gc
import os
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedmq import mqtt as edge
from fedmq.aggregator.app import make_publish
from fedmq.broker import bundle, certs, credentials
from fedmq.broker.process import Mosquitto, free_port
from fedmq.schemas.topics import Topics

pytestmark = pytest.mark.integration

NODES = ["pi-01", "pi-02", "pi-03"]


@dataclass(frozen=True)
class Deployed:
    root: Path
    broker: Mosquitto
    tls_port: int
    topics: Topics

    def bundle(self, username: str) -> bundle.Bundle:
        return bundle.load(credentials.DeploymentFiles(self.root).bundle_dir(username))


def _deploy(root: Path, *, mtls: bool) -> Iterator[Deployed]:
    federation = f"sec-{uuid.uuid4().hex[:8]}"
    tls_port = free_port()
    credentials.init_deployment(
        root,
        nodes=NODES,
        federation=federation,
        hostnames=["127.0.0.1", "localhost"],
        tls_port=tls_port,
        listen="127.0.0.1",
        mtls=mtls,
    )
    with Mosquitto(config=root / "mosquitto.conf") as broker:
        yield Deployed(root, broker, tls_port, Topics(federation))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    yield from _deploy(tmp_path_factory.mktemp("deployment"), mtls=False)


@pytest.fixture(scope="module")
def deployed_mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    yield from _deploy(tmp_path_factory.mktemp("deployment-mtls"), mtls=True)


class Probe:
    """A raw paho client: connects once (no reconnects) and records what it gets."""

    def __init__(self, client_id: str | None = None, *, persistent: bool = False) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
        self.connack: str | None = None
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.dropped = threading.Event()
        self.subscribed = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, _c, _u, _f, reason, _p) -> None:  # type: ignore[no-untyped-def]
        self.connack = str(reason)
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def _on_disconnect(self, _c, _u, _f, _reason, _p) -> None:  # type: ignore[no-untyped-def]
        self.dropped.set()
        self.answered.set()

    def _on_message(self, _c, _u, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def got(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def connect(
        self,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 10.0,
    ) -> bool:
        """True once the broker accepted us; False if it refused or hung up. A TLS
        failure on the client's side (broker not trusted) raises ssl.SSLError."""
        self.client.reconnect_delay_set(60, 60)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(
                ca_certs=str(ca),
                certfile=None if cert is None else str(cert),
                keyfile=None if key is None else str(key),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.answered.wait(timeout)
        return self.connected.is_set() and not self.dropped.is_set()

    def subscribe(self, *filters: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe([(f, qos) for f in filters])
        assert self.subscribed.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probes() -> Iterator[object]:
    made: list[Probe] = []

    def make(client_id: str | None = None, *, persistent: bool = False) -> Probe:
        made.append(Probe(client_id, persistent=persistent))
        return made[-1]

    yield make
    for probe in made:
        probe.close()
    gc.collect()  # see LEAKS_SOCKETS


# paho leaves the socket of a failed TLS handshake to the garbage collector, which warns
# (ResourceWarning, an error in this project). Tests that fail handshakes on purpose
# accept that; the probes fixture collects at teardown so it stays within those tests.
LEAKS_SOCKETS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def login(probe: Probe, deployment: Deployed, username: str, **overrides: object) -> bool:
    """Connect ``probe`` with ``username``'s bundle over TLS; ``overrides`` replace the
    bundle's password, ca, cert or key (None leaves one out)."""
    settings = deployment.bundle(username)
    options: dict[str, object] = {
        "username": username,
        "password": settings.password_file.read_text().strip(),
        "ca": settings.ca_file,
        "cert": settings.cert_file,
        "key": settings.key_file,
    }
    options.update(overrides)
    return probe.connect(deployment.tls_port, **options)  # type: ignore[arg-type]


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- who may connect ---------------------------------------------------------------------


def test_every_generated_account_connects_over_tls(deployed: Deployed, probes):
    for username in ["aggregator", "monitor", *NODES]:
        assert login(probes(), deployed, username), username


def test_anonymous_and_wrong_passwords_are_refused(deployed: Deployed, probes):
    ca = deployed.bundle("pi-01").ca_file
    anonymous = probes()
    assert not anonymous.connect(deployed.tls_port, ca=ca)
    assert "authori" in (anonymous.connack or "").lower()
    assert not login(probes(), deployed, "pi-01", password="not-the-password")
    assert not login(probes(), deployed, "pi-01", password=None)
    # a node's password is not another node's
    other = deployed.bundle("pi-02").password_file.read_text().strip()
    assert not login(probes(), deployed, "pi-01", password=other)
    assert not probes().connect(deployed.tls_port, username="nobody", password="x", ca=ca)


def test_the_loopback_listener_of_a_deployment_takes_no_anonymous_clients(
    deployed: Deployed, probes
):
    assert not probes().connect(deployed.broker.port)
    password = deployed.bundle("monitor").password_file.read_text().strip()
    assert probes().connect(deployed.broker.port, username="monitor", password=password)


@LEAKS_SOCKETS
def test_plaintext_is_refused_on_the_tls_listener(deployed: Deployed, probes):
    password = deployed.bundle("pi-01").password_file.read_text().strip()
    assert not probes().connect(deployed.tls_port, username="pi-01", password=password)


@LEAKS_SOCKETS
def test_a_client_that_does_not_trust_the_ca_fails(deployed: Deployed, probes, tmp_path: Path):
    certs.make_ca(tmp_path / "other.crt", tmp_path / "other.key", name="someone else")
    with pytest.raises(ssl.SSLCertVerificationError):
        login(probes(), deployed, "pi-01", ca=tmp_path / "other.crt")


@LEAKS_SOCKETS
def test_mutual_tls_needs_a_certificate_from_the_fleets_ca(
    deployed_mtls: Deployed, probes, tmp_path: Path
):
    assert login(probes(), deployed_mtls, "pi-01")
    # no certificate: the broker ends the handshake (TLS 1.3 reports it on first read)
    try:
        refused = not login(probes(), deployed_mtls, "pi-01", cert=None, key=None)
    except (ssl.SSLError, OSError):
        refused = True
    assert refused
    # a certificate from another CA
    certs.make_ca(tmp_path / "ca.crt", tmp_path / "ca.key", name="rogue")
    certs.make_leaf(
        tmp_path / "c.crt", tmp_path / "c.key", ca_cert=tmp_path / "ca.crt",
        ca_key=tmp_path / "ca.key", common_name="pi-01",
    )  # fmt: skip
    try:
        refused = not login(
            probes(), deployed_mtls, "pi-01", cert=tmp_path / "c.crt", key=tmp_path / "c.key"
        )
    except (ssl.SSLError, OSError):
        refused = True
    assert refused
    # a valid certificate does not replace the password
    assert not login(probes(), deployed_mtls, "pi-01", password="wrong")


# ---- who may publish and read what ---------------------------------------------------------


def test_a_node_writes_only_its_own_topics(deployed: Deployed, probes):
    topics = deployed.topics
    aggregator, monitor, other_node = probes(), probes(), probes()
    assert login(aggregator, deployed, "aggregator")
    assert login(monitor, deployed, "monitor")
    assert login(other_node, deployed, "pi-02")
    aggregator.subscribe(f"{topics.prefix}/#")
    monitor.subscribe(topics.all_status, topics.server, topics.metrics, topics.global_model)
    other_node.subscribe(f"{topics.prefix}/#")
    # node A even borrows the aggregator's fedmq client id: the broker replaces it with
    # the username, so the aggregator is not kicked off
    node = probes(client_id=f"fedmq:{topics.federation}:aggregator")
    assert login(node, deployed, "pi-01")
    forbidden = [
        topics.update("pi-02"), topics.status("pi-02"), topics.global_model,
        topics.global_delta, topics.metrics, topics.server, f"{topics.prefix}/updates/pi-01/x",
    ]  # fmt: skip
    for topic in forbidden:
        node.publish(topic, b"forged")
    node.publish(topics.update("pi-01"), b"control")  # allowed, after the forbidden ones
    node.publish(topics.status("pi-01"), b"control")
    wait_for(lambda: (topics.update("pi-01"), b"control") in aggregator.got(), "the update")
    wait_for(lambda: (topics.status("pi-01"), b"control") in monitor.got(), "the status")
    # the broker delivers to each subscriber on its own: the monitor's copy may come first
    wait_for(lambda: (topics.status("pi-01"), b"control") in aggregator.got(), "the status copy")
    assert [p for _, p in aggregator.got()] == [b"control", b"control"]
    assert monitor.got() == [(topics.status("pi-01"), b"control")]
    # another node reads no update and no status, only what the aggregator publishes
    time.sleep(0.2)
    assert other_node.got() == []
    assert not aggregator.dropped.is_set()


def test_the_aggregator_publishes_the_model_and_nodes_read_it(deployed: Deployed, probes):
    topics = deployed.topics
    aggregator, node = probes(), probes()
    assert login(aggregator, deployed, "aggregator")
    assert login(node, deployed, "pi-03")
    node.subscribe(topics.global_model, topics.global_delta, topics.metrics)
    aggregator.publish(topics.global_delta, b"delta")
    aggregator.publish(topics.metrics, b"metrics")  # not for nodes
    aggregator.publish(topics.global_model, b"model")
    wait_for(lambda: (topics.global_model, b"model") in node.got(), "the global model")
    assert node.got() == [(topics.global_delta, b"delta"), (topics.global_model, b"model")]
    aggregator.publish(topics.global_model, b"")  # clear the retained copy for other tests


def test_the_monitor_cannot_publish_at_all(deployed: Deployed, probes):
    topics = deployed.topics
    aggregator, monitor = probes(), probes()
    assert login(aggregator, deployed, "aggregator")
    assert login(monitor, deployed, "monitor")
    aggregator.subscribe(topics.all_updates, topics.all_status)
    # the monitor sees its own publishes if the broker lets them through (MQTT 3.1.1)
    monitor.subscribe(f"{topics.prefix}/#")
    for topic in [
        topics.update("monitor"), topics.status("monitor"), topics.update("pi-01"),
        topics.status("pi-01"), topics.global_model, topics.global_delta, topics.metrics,
        topics.server,
    ]:  # fmt: skip
        monitor.publish(topic, b"forged")
    aggregator.publish(topics.metrics, b"control")
    wait_for(lambda: (topics.metrics, b"control") in monitor.got(), "the control message")
    assert monitor.got() == [(topics.metrics, b"control")]
    assert aggregator.got() == []


# ---- adding and revoking nodes on a running broker ----------------------------------------


def test_add_and_revoke_take_effect_on_sighup(deployed: Deployed, probes):
    topics = deployed.topics
    root, pid = deployed.root, deployed.broker.pid
    assert pid is not None
    aggregator, staying = probes(), probes()
    assert login(aggregator, deployed, "aggregator")
    aggregator.subscribe(topics.all_updates)
    assert login(staying, deployed, "pi-01")

    credentials.add_node(root, "pi-99")
    assert not login(probes(), deployed, "pi-99")  # not before the reload
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: login(probes(), deployed, "pi-99", timeout=2), "pi-99 to be accepted")
    revoked = probes()
    assert login(revoked, deployed, "pi-99")
    kept = deployed.bundle("pi-99")  # the device's copy of its bundle
    password = kept.password_file.read_text().strip()

    credentials.revoke_node(root, "pi-99")
    assert "pi-99" not in credentials.nodes_of(root)
    assert not kept.password_file.exists()  # the broker's copy of the bundle is gone
    os.kill(pid, signal.SIGHUP)
    # mosquitto 2.0 re-checks connected clients against the reloaded password file
    assert revoked.dropped.wait(10), "the revoked node's connection survived the reload"
    again = probes()
    ca = deployed.bundle("pi-01").ca_file
    assert not again.connect(deployed.tls_port, username="pi-99", password=password, ca=ca)
    # the rest of the federation carries on, over the connection it had
    assert not staying.dropped.is_set()
    staying.publish(topics.update("pi-01"), b"after")
    wait_for(lambda: (topics.update("pi-01"), b"after") in aggregator.got(), "pi-01's update")


# ---- what the broker keeps for a node while it is away -------------------------------------

MODELS = 16
MODEL = b"m" * 9_000  # about digits-mlp's size


def publish_models(deployed: Deployed, probes, count: int) -> None:  # type: ignore[no-untyped-def]
    """``count`` rounds' models, published as the aggregator publishes them, then a QoS 1
    server status: once it is acknowledged the broker has handled every model."""
    topics = deployed.topics
    aggregator = probes()
    assert login(aggregator, deployed, "aggregator")
    outbox = edge.Outbox(aggregator.client)
    publish = make_publish(outbox, topics)
    for _ in range(count):
        publish(topics.global_delta, MODEL, False)
        publish(topics.global_model, MODEL, True)
        publish(topics.server, b"status", True)
    assert outbox.flush(10)
    aggregator.close()


def queued_for(deployed: Deployed, probes, username: str) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    """What the broker sends ``username`` when it comes back on its persistent session,
    without subscribing (so no retained copy is sent): its queue, which the broker sends
    before a QoS 1 marker published after the login. Retries the login until the broker
    (after a reload) accepts it; a refused login leaves the session alone, and a
    clean-session login would end it, so no other probe logs in as ``username``."""
    topics = deployed.topics
    deadline = time.monotonic() + 10
    while not login(back := probes(persistent=True), deployed, username, timeout=2):
        assert time.monotonic() < deadline, f"{username} not accepted"
    marker = probes()
    assert login(marker, deployed, "aggregator")
    marker.publish(topics.global_delta, b"marker")
    wait_for(lambda: (topics.global_delta, b"marker") in back.got(), "the marker")
    back.close()  # away again, on the same session
    got = back.got()
    return got[: got.index((topics.global_delta, b"marker"))]


def test_a_node_account_makes_the_broker_keep_no_models_for_it(deployed: Deployed, probes):
    # issue 11: a node account subscribed to the global topics at QoS 1 on a persistent
    # session and disconnected; the broker queued 32 models in 6 s, kept queueing after
    # revoke-node, and a re-added device inherited them.
    topics = deployed.topics
    root, pid = deployed.root, deployed.broker.pid
    assert pid is not None
    credentials.add_node(root, "pi-q")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not login(away := probes(persistent=True), deployed, "pi-q", timeout=2):
        assert time.monotonic() < deadline, "pi-q not accepted"
    away.subscribe(topics.global_model, topics.global_delta, qos=1)
    away.close()
    try:
        publish_models(deployed, probes, MODELS)
        assert queued_for(deployed, probes, "pi-q") == []

        kept = deployed.bundle("pi-q")  # the device's copy of its bundle
        password = kept.password_file.read_text().strip()
        ca = deployed.bundle("pi-01").ca_file  # the same CA; pi-q's copy goes with it
        credentials.revoke_node(root, "pi-q")
        os.kill(pid, signal.SIGHUP)

        def refused() -> bool:
            probe = probes(persistent=True)
            return not probe.connect(
                deployed.tls_port, username="pi-q", password=password, ca=ca, timeout=2
            )

        wait_for(refused, "pi-q refused")
        publish_models(deployed, probes, MODELS)
        credentials.add_node(root, "pi-q")  # the device re-added: a new password, same id
        os.kill(pid, signal.SIGHUP)
        assert queued_for(deployed, probes, "pi-q") == []
    finally:  # clear the retained copies for other tests
        cleaner = probes()
        assert login(cleaner, deployed, "aggregator")
        cleaner.publish(topics.global_model, b"")
        cleaner.publish(topics.server, b"")
