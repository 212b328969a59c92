"""The thin edge around paho-mqtt 2.x shared by nodes, aggregator, monitor and demo."""

import queue
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import paho.mqtt.client as mqtt
import structlog

from fedmq.netloop import NetworkLoop
from fedmq.publish_reader import cut_publishes, fixed_header
from fedmq.settings import HelpGroup, setting, usage_errors

log = structlog.get_logger()


@dataclass(frozen=True)
class Credentials:
    """Who we are to the broker, and how we know it is the broker (TLS).

    ``ca_file`` switches TLS on (1.2 or newer): the broker's certificate must be signed
    by that CA and name the host we connect to. ``cert_file``/``key_file`` add our own
    certificate (mutual TLS). The password is read from a file, never given on a command
    line (where ``ps`` would show it)."""

    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def problem(self) -> str | None:
        """Why these settings cannot work, naming the setting; None if they can."""
        if self.password_file is not None and self.username is None:
            return "a password file needs a username"
        if (self.cert_file is None) != (self.key_file is None):
            return "a client certificate needs its key, and a key its certificate"
        if self.cert_file is not None and self.ca_file is None:
            return "a client certificate needs TLS: give the CA file too"
        for name in ("password_file", "ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                return f"{name.replace('_', ' ')} {path} does not exist"
        return None

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        lines = Path(self.password_file).read_text().splitlines()
        return lines[0] if lines else ""

    def tls_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883
    credentials: Credentials = field(default_factory=Credentials, compare=False)

    @classmethod
    def parse(cls, text: str) -> "BrokerAddress":
        """``HOST:PORT`` or ``HOST`` (port 1883)."""
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"broker address {text!r} is not HOST:PORT")
        return cls(host, int(port))

    def __str__(self) -> str:
        tls = " (TLS)" if self.credentials.ca_file is not None else ""
        return f"{self.host}:{self.port}{tls}"


@usage_errors
def _broker(text: str) -> BrokerAddress:
    return BrokerAddress.parse(text)


def _address(broker: BrokerAddress) -> str:
    return f"{broker.host}:{broker.port}"


CONNECTION = "connection"
_CREDENTIALS = HelpGroup(
    "broker credentials", "for a broker with passwords and TLS (see docs/security.md)"
)


@dataclass(frozen=True, kw_only=True)
class ConnectionSettings:
    """Where the broker is and who we are to it: the keys of ``[connection]``, shared by
    every client of a broker (node, aggregator, monitor), so one file serves them all."""

    broker: BrokerAddress = setting(
        BrokerAddress(),
        section=CONNECTION,
        parse=_broker,
        show=_address,
        metavar="HOST:PORT",
        help="MQTT broker (default 127.0.0.1:1883)",
    )
    federation: str = setting(
        "default",
        section=CONNECTION,
        kept="federation",
        metavar="ID",
        help="federation id, the second topic level (default 'default')",
    )
    username: str | None = setting(
        None, section=CONNECTION, group=_CREDENTIALS, help="MQTT username"
    )
    password_file: Path | None = setting(
        None, section=CONNECTION, group=_CREDENTIALS, parse=Path, metavar="PATH",
        help="first line: password",
    )  # fmt: skip
    tls_ca: Path | None = setting(
        None, section=CONNECTION, group=_CREDENTIALS, parse=Path, metavar="PATH",
        help="CA certificate: use TLS",
    )  # fmt: skip
    tls_cert: Path | None = setting(
        None, section=CONNECTION, group=_CREDENTIALS, parse=Path, metavar="PATH",
        help="client certificate (mTLS)",
    )  # fmt: skip
    tls_key: Path | None = setting(
        None, section=CONNECTION, group=_CREDENTIALS, parse=Path, metavar="PATH",
        help="client key (mTLS)",
    )  # fmt: skip

    @property
    def credentials(self) -> Credentials:
        return Credentials(
            username=self.username,
            password_file=self.password_file,
            ca_file=self.tls_ca,
            cert_file=self.tls_cert,
            key_file=self.tls_key,
        )

    def with_credentials(self: "C") -> "C":
        """These settings with the credentials folded into ``broker``, which the roles
        connect to; ValueError with the reason if they cannot work (a missing file, a
        certificate without its key)."""
        problem = self.credentials.problem()
        if problem is not None:
            raise ValueError(f"broker credentials: {problem}")
        return replace(self, broker=replace(self.broker, credentials=self.credentials))


C = TypeVar("C", bound=ConnectionSettings)


# Pseudo-topic of the message ``make_client`` puts in the inbox after every successful
# (re)connect, so the worker thread that owns the state can republish what it owns.
CONNECTED = "$fedmq/connected"
# Pseudo-topic of the message put in the inbox when the broker acknowledges an
# unsubscribe made with a tag (``make_client``'s ``settle``, ``fetch_retained``); its
# payload is the tag. A broker that answers a client's packets in order (mosquitto does)
# has sent the retained messages of the subscriptions made before by then.
SETTLED = "$fedmq/settled"


# First reconnect delay in seconds, before jitter (each outage draws 0.5x-1.5x of it).
RECONNECT_MIN_DELAY = 1.0


def _jittered(seconds: float) -> float:
    # paho annotates the delay as int but sleeps any number of seconds
    return seconds * random.uniform(0.5, 1.5)


# Consecutive login refusals (bad username or password, not authorised) before a client
# gives up: a password does not fix itself, but a broker reloading its password file may
# refuse a moment. The role then exits 2 (``check``).
LOGIN_TRIES = 3
# CONNACK reason codes of a refused login (MQTT 5 numbering; paho maps 3.1.1's 4 and 5
# to 134 and 135): bad user name or password, not authorized, bad authentication method.
_LOGIN_REFUSED = frozenset({134, 135, 140})
# A client not connected when it stops waits this long for paho's thread (which may be
# in a connect attempt); the thread is a daemon and ends with the process anyway.
STOP_WAIT_UNCONNECTED = 0.2
# A connected client on a shared network loop waits this long for its DISCONNECT to be
# written (paho's own thread is waited for without a bound; it takes milliseconds).
STOP_WAIT_CONNECTED = 10.0


class LoginRefused(RuntimeError):
    """The broker refused our login ``LOGIN_TRIES`` times in a row: a configuration error."""

    def __init__(self, broker: "BrokerAddress", reason: str, tries: int) -> None:
        user = broker.credentials.username
        who = f"the login of user {user!r}" if user is not None else "an anonymous login"
        super().__init__(
            f"the broker at {broker} refused {who} {tries} times ({reason}): check --username "
            "and --password-file (and the broker's password and ACL files)"
        )


def describe_connect_error(error: OSError, broker: "BrokerAddress") -> str:
    """Why a connect attempt failed, in words, with a hint where one helps."""
    where = f"{broker.host}:{broker.port}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"the TLS certificate of {where} was not accepted ({error.verify_message}): "
            f"--tls-ca must be the CA that signed it, and it must name {broker.host}"
        )
    tls = broker.credentials.ca_file is not None
    if isinstance(error, ssl.SSLError) or (tls and isinstance(error, ConnectionError)):
        return (
            f"TLS handshake with {where} failed ({error}): if that port speaks plain MQTT, "
            "use the broker's TLS port, or drop --tls-ca"
        )
    if isinstance(error, ConnectionRefusedError):
        return (
            f"connection refused by {where}: no broker listens there "
            "(is it running? is the port right?)"
        )
    if isinstance(error, socket.gaierror):
        return f"unknown host {broker.host} ({error.strerror}): check the name in --broker"
    if isinstance(error, TimeoutError):
        return f"no answer from {where}: the host is down, or a firewall drops the packets"
    return f"cannot connect to {where}: {error.strerror or error}"


def describe_hang_up(broker: "BrokerAddress") -> str:
    """Why a broker may close the connection before answering our CONNECT."""
    where = f"{broker.host}:{broker.port}"
    if broker.credentials.ca_file is None:
        hint = "if it is a TLS listener, give --tls-ca (the CA file)"
    else:
        hint = "its log says why (a listener that wants client certificates: --tls-cert/--tls-key)"
    return f"{where} closed the connection before answering CONNECT: {hint}"


class Client(mqtt.Client):
    """paho's client, keeping what paho drops: why the last connect attempt failed, and
    whether the broker refused our login for good (``check``)."""

    broker: "BrokerAddress | None" = None
    connect_error: OSError | None = None
    refused: LoginRefused | None = None
    # The shared network loop driving this client (``start(network=...)``), or None:
    # paho's own thread (``loop_start``).
    network: NetworkLoop | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settle_lock = threading.Lock()
        self.settling: dict[int, bytes] = {}  # tagged UNSUBSCRIBE mid -> tag
        self.settled_early: set[int] = set()  # UNSUBACKs that came before their mid was kept
        self.settled_to: Inbox | None = None  # where Received(SETTLED, tag) goes
        self._ahead = bytearray()

    # Bytes read ahead of paho from its socket by ``read_ahead`` (``Loop``): paho's own
    # reads take them first (``_sock_recv``), so it reads the stream in order.
    READ_AHEAD = 256 * 1024
    _ahead: bytearray
    _ahead_of: Any = None  # the socket the bytes came from
    read_ended = False  # the last ``read_ahead`` met the end of the connection, or an error

    def read_ahead(self) -> bool:
        """One ``recv`` of up to ``READ_AHEAD`` bytes, kept for ``take_publishes`` and
        paho's reads. True if bytes came; False if none were waiting, or the connection
        ended or failed (paho's next read from the socket sees that again, and says so)."""
        sock = self._sock
        if sock is None:
            return False
        if self._ahead_of is not sock:  # a new connection: what the old one left is void
            self._ahead, self._ahead_of = bytearray(), sock
        self.read_ended = False
        try:
            data = super()._sock_recv(self.READ_AHEAD)
        except BlockingIOError:
            return False
        except OSError:  # paho meets it again in its next read (loop_read)
            self.read_ended = True
            return False
        if not data:
            self.read_ended = True
            return False
        self._ahead += data
        _note_received(self)
        return True

    def take_publishes(self, into: "Batch", limit: int) -> bool:
        """Move the whole QoS 0/1 PUBLISH packets at the front of what was read ahead
        into ``into`` (at most ``limit``), as ``make_client``'s ``on_message`` would; True
        if a whole packet that paho must read (any other, or one paho is in the middle
        of) waits in front."""
        ahead = self._pending()
        if not ahead:
            return False
        if self._in_packet["command"] != 0:  # paho has read part of a packet: its turn
            return True
        found, used, other = cut_publishes(ahead, limit)
        if used:
            del ahead[:used]
            into.extend(map(Received._make, found))
        return other

    def whole_packet_ahead(self) -> bool:
        """Whether a whole packet waits in what was read ahead (or bytes of the packet
        paho is in the middle of): then there is something to read without ``select``."""
        ahead = self._pending()
        if not ahead:
            return False
        if self._in_packet["command"] != 0:
            return True
        header = fixed_header(ahead)
        return header is not None and sum(header) <= len(ahead)

    def _pending(self) -> bytearray | None:
        """What was read ahead from the current socket and not yet taken (None: nothing
        read ahead from this connection)."""
        return self._ahead if self._ahead_of is self._sock else None

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho 2.x reads every byte of a packet through this private method (2.0.0 to
        # 2.2.0, the newest 2.x, alike): bytes read ahead go first, in order
        ahead = self._pending()
        if ahead:
            data = bytes(ahead[:bufsize])
            del ahead[:bufsize]
            return data
        return super()._sock_recv(bufsize)

    def reconnect(self) -> mqtt.MQTTErrorCode:
        # paho's loop calls this for the first connect and every reconnect, and turns an
        # OSError into on_connect_fail without the error
        try:
            return super().reconnect()
        except OSError as error:
            self.connect_error = error
            raise


def _note_received(client: mqtt.Client) -> None:
    """Bytes came from the broker: what paho's reads note for its keepalive (paho 2.2
    ``_last_bytes_received``, 2.0 ``_last_msg_in``)."""
    now = getattr(mqtt, "time_func", time.monotonic)()
    with client._msgtime_mutex:
        for name in ("_last_bytes_received", "_last_msg_in"):
            if hasattr(client, name):
                setattr(client, name, now)


def check(client: mqtt.Client) -> None:
    """Raise ``LoginRefused`` once the broker has refused our login for good (a client
    not made by ``make_client`` never gives up, so never raises)."""
    refused = getattr(client, "refused", None)
    if refused is not None:
        raise refused


def make_client_id(federation: str, role: str, node_id: str | None = None) -> str:
    """``fedmq:<federation>:aggregator`` or ``fedmq:<federation>:node:<id>``; ``:`` is not
    allowed in ids, so two clients of different roles or federations never collide."""
    return f"fedmq:{federation}:{role}" + (f":{node_id}" if node_id is not None else "")


class Received(NamedTuple):
    """A message handed from paho's network thread to the worker that owns the state.

    A named tuple, not a frozen dataclass: the aggregator makes one per update it reads,
    and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost
    ~1.5 us of it; ``Received._make`` takes a ``publish_reader.Publish`` as it is."""

    topic: str
    payload: bytes
    retain: bool
    mid: int = 0  # with manual acknowledgement: pass to ``acknowledge_all`` once handled
    qos: int = 0


class Inbox(Protocol):
    """Where ``make_client`` drops what it receives: an unbounded ``queue.Queue[Received]``
    or ``queue.SimpleQueue``, or anything with their ``put`` (``fedmq.node.group`` tags
    each node's messages on their way into the one queue its worker reads). It takes
    every message at once: paho's network thread never waits for the receiver (a thread
    that waited for room while the receiver waited on paho hung restarted aggregators)."""

    def put(self, item: Received, /) -> None: ...


def make_client(
    client_id: str,
    *,
    subscriptions: Iterable[tuple[str, int]] = (),
    will: tuple[str, bytes] | None = None,
    inbox: Inbox | None = None,
    ready: threading.Event | None = None,
    persistent: bool = False,
    manual_ack: bool = False,
    settle: Iterable[str] = (),
) -> Client:
    """A client that (re)subscribes on every connect and drops messages into ``inbox``.

    ``ready`` is set once the broker has granted the subscriptions (or, without any, once
    connected): publish what others answer only after that, or their answers are missed.

    Reconnects are paho's own loop with exponential back-off up to 30 s, starting from a
    random 0.5-1.5 s drawn anew after every disconnect, so a fleet that lost its broker
    does not reconnect in lock-step. The first connect is retried the same way, so a node
    may start before its broker. After every successful connect a
    ``Received(CONNECTED, ...)`` is put into ``inbox``.

    ``persistent``: a persistent session (clean session off) under this stable client id,
    so the broker keeps the subscriptions and queues QoS 1 messages while we are away.
    ``manual_ack``: PUBACK only when the receiver calls ``acknowledge_all`` (after it has
    made the message durable); unacknowledged messages are redelivered on reconnect.
    ``settle``: topics unsubscribed on every connect right after subscribing (a
    persistent session may still hold them); the UNSUBACK puts ``Received(SETTLED,
    b"connect")`` in ``inbox``, after the retained messages of ``subscriptions`` on a
    broker that answers in order.

    Every failed attempt is a warning ``mqtt.connect_failed`` with the cause in words
    (``describe_connect_error``, ``describe_hang_up``, or the broker's refusal). After
    ``LOGIN_TRIES`` refused logins in a row the client stops trying and ``check`` raises.
    """
    client = Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=not persistent,
        manual_ack=manual_ack,
    )
    client.max_queued_messages_set(0)  # keep every QoS 1 publish until the broker has it
    client.max_inflight_messages_set(100)
    client.reconnect_delay_set(min_delay=_jittered(RECONNECT_MIN_DELAY), max_delay=30)  # type: ignore[arg-type]
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    wanted = list(subscriptions)
    leaving = list(settle)

    failures = 0  # failed attempts since the last successful connect
    refusals = 0  # refused logins in a row
    answer: str | None = None  # on the current socket: None until CONNACK, then its verdict

    def failed(reason: str) -> None:
        nonlocal failures
        failures += 1
        log.warning(
            "mqtt.connect_failed",
            client_id=client_id,
            broker=str(client.broker),
            attempt=failures,
            reason=reason,
        )

    def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
        error = client.connect_error
        broker = client.broker or BrokerAddress()
        failed(describe_connect_error(error, broker) if error is not None else "unknown cause")

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        nonlocal failures, refusals, answer
        if reason.is_failure:
            answer = "refused"
            broker = client.broker or BrokerAddress()
            login = reason.value in _LOGIN_REFUSED
            hint = ": check --username and --password-file" if login else ""
            failed(f"the broker refused the connection ({reason}){hint}")
            refusals = refusals + 1 if login else 0
            if refusals >= LOGIN_TRIES:
                client.refused = LoginRefused(broker, str(reason), refusals)
                client.disconnect()  # stop paho's retries; the role exits (``check``)
            return
        answer = "accepted"
        if failures:
            log.info("mqtt.connected", client_id=client_id, failed_attempts=failures)
        else:
            log.debug("mqtt.connected", client_id=client_id)
        failures = refusals = 0
        if inbox is not None:
            inbox.put(Received(CONNECTED, b"", False))
        with client.settle_lock:
            client.settling.clear()
            client.settled_early.clear()
        if wanted:
            client.subscribe(wanted)
        elif ready is not None:
            ready.set()
        if leaving:  # in this callback, so its UNSUBACK cannot come before the mid is kept
            _, mid = client.unsubscribe(leaving)
            if mid is not None:
                with client.settle_lock:
                    client.settling[mid] = b"connect"

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        refused = [str(code) for code in codes if code.is_failure]
        if refused:
            log.error("mqtt.subscribe_refused", client_id=client_id, reasons=refused)
        elif ready is not None:
            ready.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        nonlocal answer
        previous, answer = answer, None
        if previous != "accepted":  # refused (logged in on_connect), or hung up before answering
            if previous is None and client.refused is None and reason.is_failure:
                failed(describe_hang_up(client.broker or BrokerAddress()))
            return  # and the back-off keeps doubling: the next try is no likelier to work
        if reason.is_failure:
            log.warning("mqtt.disconnected", client_id=client_id, reason=str(reason))
        # a fresh random start for this outage's back-off (also resets the doubling)
        client.reconnect_delay_set(min_delay=_jittered(RECONNECT_MIN_DELAY), max_delay=30)  # type: ignore[arg-type]

    def on_socket_open(_c: mqtt.Client, _u: Any, sock: Any) -> None:
        nonlocal answer
        answer = None
        # paho leaves Nagle's algorithm on: a small publish after a large one would then
        # wait for the broker's delayed ACK (40 ms on Linux) instead of leaving at once.
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail
    client.on_disconnect = on_disconnect
    client.on_socket_open = on_socket_open
    client.on_subscribe = on_subscribe
    if inbox is not None:
        client.settled_to = settled_to = inbox

        def on_unsubscribe(_c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
            with client.settle_lock:
                tag = client.settling.pop(mid, None)
                if tag is None:
                    client.settled_early.add(mid)
            if tag is not None:
                settled_to.put(Received(SETTLED, tag, False))

        client.on_unsubscribe = on_unsubscribe

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            inbox.put(
                Received(
                    message.topic,
                    bytes(message.payload),
                    bool(message.retain),
                    mid=message.mid,
                    qos=message.qos,
                )
            )

        client.on_message = on_message
    return client


class Outbox:
    """QoS 1 publishing with a way to wait until the broker has acknowledged everything.

    paho queues a QoS 1 message published while disconnected and sends it on reconnect,
    but its ``wait_for_publish`` raises for such a message; tracking PUBACKs by message id
    works whatever the connection state. A QoS 0 message (``qos=0``) is sent if connected
    and otherwise dropped; nothing waits for it.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._unacked: set[int] = set()
        self._unsent: set[int] = set()  # QoS 0: paho calls on_publish once written
        self._acked_early: set[int] = set()
        self._changed = threading.Condition()
        client.on_publish = self._on_publish

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._changed:
            if mid in self._unacked:
                self._unacked.discard(mid)
            elif mid in self._unsent:
                self._unsent.discard(mid)
            else:  # PUBACK (or QoS 0 write) raced ahead of publish() returning
                self._acked_early.add(mid)
            self._changed.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise RuntimeError(f"paho's queue is full, {topic} not sent")
        if qos == 0 and info.rc != mqtt.MQTT_ERR_SUCCESS:
            return  # not connected: dropped, no on_publish will come
        with self._changed:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            elif qos == 0:
                self._unsent.add(info.mid)
            else:
                self._unacked.add(info.mid)

    @property
    def unacknowledged(self) -> int:
        with self._changed:
            return len(self._unacked)

    def flush(self, timeout: float) -> bool:
        """Wait until every publish so far is acknowledged; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._unacked, timeout=timeout)


T = TypeVar("T")


def drain(
    inbox: "queue.Queue[T] | queue.SimpleQueue[T]", first: T, *, limit: int | None = None
) -> list[T]:
    """``first`` and what is queued behind it (up to ``limit`` messages in all)."""
    batch = [first]
    while limit is None or len(batch) < limit:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            break
    return batch


_PUBACK_TYPE = 0x40  # MQTT PUBACK, the fixed header's first byte
_PUBACK = struct.Struct("!BBH")  # that byte, remaining length 2, the packet identifier


def acknowledge_all(client: mqtt.Client, batch: Iterable[Received]) -> None:
    """Send the PUBACKs of messages received with ``manual_ack`` (none for QoS 0), in
    order, as one write to the socket.

    paho's ``ack`` queues each PUBACK as a packet of its own, wakes its network thread
    for it and writes it with a ``send`` call of its own: at a thousand updates a second
    that is a good part of the aggregator's work. Here the PUBACKs of a batch are joined
    into one write, queued where paho's ``ack`` queues them (a client's private
    ``_packet_queue``, paho 2.x). MQTT packets follow each other on the stream: the broker
    reads the same PUBACKs in the same order. Without manual acknowledgement there is
    nothing to send, as with ``ack``; a client without that queue, and QoS 2 (which the
    roles never subscribe with), get ``ack`` for each message."""
    if not getattr(client, "_manual_ack", False):
        return
    queue_packet = getattr(client, "_packet_queue", None)
    mids = []
    for received in batch:
        if received.qos == 1 and queue_packet is not None:
            mids.append(received.mid)
        elif received.qos > 0:
            client.ack(received.mid, received.qos)
    if mids and queue_packet is not None:
        packet = b"".join([_PUBACK.pack(_PUBACK_TYPE, 2, mid) for mid in mids])
        queue_packet(_PUBACK_TYPE, packet, 0, 0)


def start(
    client: Client,
    broker: BrokerAddress,
    *,
    keepalive: int = 30,
    network: NetworkLoop | None = None,
) -> None:
    """Connect in the background (retrying until the broker answers) and run paho's loop,
    or, given ``network``, let that one thread drive this client with many others
    (``fedmq.netloop``: what a node group does)."""
    _configure(client, broker)
    client.connect_async(broker.host, broker.port, keepalive=keepalive)
    if network is None:
        client.loop_start()
    else:
        client.network = network
        network.add(client)


class Batch(list[Received]):
    """An inbox that is a plain list: for a client whose network loop runs in the same
    thread as its receiver (``Loop``), nothing to hand over between threads."""

    def put(self, item: Received, /) -> None:
        self.append(item)


class Loop:
    """paho's network loop run by the receiver's own thread (paho's external-loop API:
    ``loop_read``, ``loop_write``, ``loop_misc``; no ``loop_start``), for a client made
    with ``make_client(..., inbox=inbox)`` and the same ``inbox``.

    One thread receives and handles: no queue between paho's thread and the receiver,
    and no thread waiting on another (a paho thread that waited for the receiver while
    the receiver waited on paho hung restarted aggregators). What paho's own loop does
    is done here: the first connect and every reconnect, retried with the back-off of
    ``make_client`` (a random 0.5-1.5 s, doubling up to 30 s, drawn anew after each
    outage), keepalive pings, and writes a callback queued. While it connects (a TCP and
    maybe TLS handshake, at most paho's 5 s connect timeout) the thread waits for it.

    Reading is not paho's packet by packet: the socket is read ahead in large reads
    (``Client.read_ahead``) and the PUBLISH packets are cut from those bytes
    (``fedmq.publish_reader``) straight into ``inbox``, as ``make_client``'s
    ``on_message`` puts them (a client with ``message_callback_add`` filters would need
    paho's routing: not one to run here). Any other packet paho reads from the same bytes
    (``Client._sock_recv``), in stream order: CONNACK, SUBACK, PINGRESP and the rest, a
    QoS 2 or malformed PUBLISH, the end of the connection. paho's debug log line per
    PUBLISH is not written for the packets cut here.
    """

    MAX_DELAY = 30.0
    # A turn of ``run`` reads on while messages come; this many reads in a row that give
    # none (packets of other kinds, parts of a large update) end it.
    MAX_IDLE_READS = 64

    def __init__(self, client: Client, inbox: Batch) -> None:
        self.client = client
        self.inbox = inbox
        self._delay: float | None = None  # the back-off's next wait; None when connected
        self._next_attempt = 0.0
        self._stopped = False
        self._connected = False

    def start(self, broker: BrokerAddress, *, keepalive: int = 30) -> None:
        """Connect on the first ``run`` (retrying until the broker answers)."""
        _configure(self.client, broker)
        self.client.connect_async(broker.host, broker.port, keepalive=keepalive)

    def run(self, timeout: float, *, limit: int = 4096) -> None:
        """Wait up to ``timeout`` seconds for the broker, then read what it has sent (up
        to ``limit`` messages into ``inbox``, without waiting again), write what is
        queued and keep the connection alive; connect when the back-off allows. A flood
        is read ``limit`` messages at a time: a ``wait_for`` sees its answer in time."""
        client = self.client
        sock = client.socket()
        if sock is None:
            self._connect(timeout)
            return
        writing = [sock] if client.want_write() else []
        # select does not see bytes already read ahead: with a whole packet waiting
        # there, only look whether the socket takes writes
        waiting = client.whole_packet_ahead()
        try:
            readable, _, _ = select.select([sock], writing, [], 0 if waiting else timeout)
        except (OSError, ValueError):  # closed under us (a lost connection)
            readable = []
        if readable or waiting:
            self._read(limit)
        if client.want_write():
            client.loop_write()
        client.loop_misc()
        if client.is_connected():
            self._delay = None
            self._connected = True

    def _read(self, limit: int) -> None:
        """Read what the broker sent (up to ``limit`` messages into ``inbox``): the socket
        ahead in large reads, the PUBLISH packets cut from them here
        (``fedmq.publish_reader``), any other packet read by paho from the same bytes."""
        client, inbox = self.client, self.inbox
        most = len(inbox) + limit
        more = client.read_ahead()
        idle = 0  # turns in a row without a message: bounded, as a turn of ``run`` is
        while len(inbox) < most and idle < self.MAX_IDLE_READS:
            before = len(inbox)
            idle += 1
            if client.take_publishes(inbox, most - len(inbox)):
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                    return  # the connection is gone (paho has called on_disconnect)
            elif more:  # what is left ahead is part of a packet at most: read on
                more = client.read_ahead()
            else:  # nothing more waits; if the connection ended, paho's read says so
                if client.read_ended and client.socket() is not None:
                    client.loop_read()
                return
            if len(inbox) > before:
                idle = 0

    def _connect(self, timeout: float) -> None:
        client = self.client
        if self._stopped or client.refused is not None:
            time.sleep(timeout)
            return
        now = time.monotonic()
        if self._connected:  # lost: wait the back-off before trying again, as paho does
            self._connected = False
            self._schedule(now)
        if now < self._next_attempt:
            time.sleep(min(self._next_attempt - now, timeout))
            return
        try:
            client.reconnect()
        except OSError:
            if client.on_connect_fail is not None:
                client.on_connect_fail(client, None)
            self._schedule(now)

    def _schedule(self, now: float) -> None:
        if self._delay is None:
            self._delay = _jittered(RECONNECT_MIN_DELAY)
        else:
            self._delay = min(self._delay * 2, self.MAX_DELAY)
        self._next_attempt = now + self._delay

    def take(self) -> list[Received]:
        """What was received since the last ``take``."""
        batch = list(self.inbox)
        self.inbox.clear()
        return batch

    def wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the loop until ``done()`` or ``timeout`` seconds; ``done()`` at the end."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.run(min(left, 0.1), limit=64)
        return done()

    def stop(self, timeout: float = 1.0) -> None:
        """Disconnect and connect no more: the DISCONNECT goes out after what is queued
        before it (``timeout`` seconds at most), then paho closes the socket."""
        self._stopped = True
        self.client.disconnect()
        self.wait_for(lambda: self.client.socket() is None, timeout)


def _configure(client: Client, broker: BrokerAddress) -> None:
    client.broker = broker
    credentials = broker.credentials
    problem = credentials.problem()
    if problem is not None:
        raise ValueError(problem)
    if credentials.username is not None:
        client.username_pw_set(credentials.username, credentials.password())
    context = credentials.tls_context()
    if context is not None:
        client.tls_set_context(context)


def stop(client: mqtt.Client) -> None:
    """Disconnect and end paho's thread. Not connected, wait for that thread at most
    ``STOP_WAIT_UNCONNECTED`` s: it may be sleeping between attempts or inside one (up
    to paho's 5 s connect timeout), and a stop must not wait for that."""
    connected = client.is_connected()
    client.disconnect()
    network = getattr(client, "network", None)
    if network is not None:  # the shared loop writes the DISCONNECT, then lets go
        network.leave(client).wait(STOP_WAIT_CONNECTED if connected else STOP_WAIT_UNCONNECTED)
        return
    if connected:
        client.loop_stop()
        return
    stopper = threading.Thread(target=client.loop_stop, daemon=True)
    stopper.start()
    stopper.join(STOP_WAIT_UNCONNECTED)


def unsubscribe(
    client: mqtt.Client, topics: list[str], *, timeout: float, loop: Loop | None = None
) -> bool:
    """Unsubscribe from ``topics`` and wait for the broker's UNSUBACK; False on timeout.

    Call it before ``stop`` when the broker must discard our last will: the broker sends
    nothing on these topics after its UNSUBACK, and paho has read all it sent before. A
    socket closed with unread data is reset instead of closed, and mosquitto 2.0 writes
    to a writable socket before reading it: a write that meets the reset drops the
    connection as lost, with our DISCONNECT unread behind it, and publishes the will.
    With ``loop`` (the client's network loop runs in this thread) that loop runs meanwhile."""
    acked: set[int] = set()
    changed = threading.Condition()

    def on_unsubscribe(_c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with changed:  # may come before unsubscribe() returns its mid
            acked.add(mid)
            changed.notify_all()

    previous = client.on_unsubscribe
    client.on_unsubscribe = on_unsubscribe
    try:
        rc, mid = client.unsubscribe(topics)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return False
        if loop is not None:  # the UNSUBACK comes in this thread
            return loop.wait_for(lambda: mid in acked, timeout)
        with changed:
            return changed.wait_for(lambda: mid in acked, timeout=timeout)
    finally:
        client.on_unsubscribe = previous


def fetch_retained(client: Client, topic: str, *, qos: int = 0) -> bool:
    """Take the retained message of ``topic`` once: subscribe and at once unsubscribe, so
    nothing published later comes. Needs a client made by ``make_client`` with an
    ``inbox``: the UNSUBACK puts ``Received(SETTLED, b"fetch")`` in it, after the retained
    message on a broker that answers in order. False if not connected (nothing sent)."""
    rc, _ = client.subscribe(topic, qos=qos)
    if rc != mqtt.MQTT_ERR_SUCCESS:
        return False
    rc, mid = client.unsubscribe(topic)
    if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
        return False
    with client.settle_lock:
        early = mid in client.settled_early
        client.settled_early.discard(mid)
        if not early:
            client.settling[mid] = b"fetch"
    if early and client.settled_to is not None:  # the UNSUBACK beat unsubscribe()'s return
        client.settled_to.put(Received(SETTLED, b"fetch", False))
    return True


def unique_suffix() -> str:
    return f"{random.getrandbits(32):08x}"
