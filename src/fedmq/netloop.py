"""One network thread for many paho clients: the hundreds of nodes of ``fedmq node-group``.

paho's own loop (``loop_start``) is one thread per client around ``select()``, and
``select()`` cannot watch a socket numbered 1024 or more: a group of 300 nodes brought 240
online, and paho took the select error of the others for a lost connection and retried
forever, silently. Here one thread watches every client's socket through ``selectors``
(epoll on Linux: no such limit) with paho 2.x's external-loop API: ``loop_read`` when a
socket is readable, ``loop_write`` when it is writable and paho has something to send
(``want_write``, kept up to date by ``on_socket_register_write``/``_unregister_write``),
``loop_misc`` (keep-alive) once a second for every client.

Connecting blocks (TCP connect up to paho's 5 s timeout, then the TLS handshake), so the
connects run on a second thread, one at a time: the network thread never waits on a
broker. Reconnects follow paho's own rule (``loop_forever``): after a lost connection or a
failed attempt, wait the client's back-off (``reconnect_delay_set``: from its minimum,
doubling up to its maximum, reset by an accepted CONNACK), then try again; a client that
asked to disconnect is not reconnected.

Thread safety: the client's owner publishes from its own thread while this one reads and
writes. paho guards its message state with its own locks and queues a packet in a deque;
the register-write callback only marks the client and wakes the loop, which then asks
paho (``want_write``) rather than trusting the order the callbacks arrived in.
"""

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
import structlog

log = structlog.get_logger()

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
MISC_EVERY = 1.0  # seconds between ``loop_misc`` calls (paho's loop: at most 1 s)
# A client that asked to disconnect (paho's states; paho's loop stops on these too).
_DISCONNECTING = ("MQTT_CS_DISCONNECTING", "MQTT_CS_DISCONNECTED")


def _wants_out(client: mqtt.Client) -> bool:
    return client._state.name in _DISCONNECTING


class _Link:
    """What the loop knows of one client."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.sock: Any = None  # the socket registered with the selector
        self.connecting = False  # a connect attempt is running on the connect thread
        self.due: float | None = None  # when the next connect attempt is due
        self.leaving = False  # its owner stopped it (``leave``)
        self.gone = threading.Event()  # set once the loop has let go of it


def _next_delay(client: mqtt.Client) -> float:
    """The client's next reconnect delay, as paho's ``_reconnect_wait`` computes it."""
    with client._reconnect_delay_mutex:
        if client._reconnect_delay is None:
            client._reconnect_delay = client._reconnect_min_delay
        else:
            client._reconnect_delay = min(client._reconnect_delay * 2, client._reconnect_max_delay)
        return float(client._reconnect_delay)


class NetworkLoop:
    """Drive the network of many paho clients from one thread (and connect them from a
    second): ``start``, then ``add`` each client after ``connect_async``, ``leave`` it
    after ``disconnect``, and ``close`` at the end."""

    def __init__(self, name: str = "fedmq-network") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, READ, None)
        self._lock = threading.Lock()  # the selector's registrations, and the sets below
        self._links: dict[int, _Link] = {}  # by id(client)
        self._dirty: set[_Link] = set()  # write interest to look at again
        self._attempted: deque[_Link] = deque()  # connect attempts that ended
        self._pending: set[_Link] = set()  # TLS: bytes decrypted, not yet read
        self._timers: list[tuple[float, int, _Link]] = []  # due connect attempts
        self._order = itertools.count()
        self._to_connect: deque[_Link | None] = deque()
        self._connect_ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._connector = threading.Thread(
            target=self._connect_forever, name=f"{name}-connect", daemon=True
        )

    def start(self) -> "NetworkLoop":
        self._thread.start()
        self._connector.start()
        return self

    # ------------------------------------------------------------ the owner's side

    def add(self, client: mqtt.Client) -> None:
        """Take over ``client`` (after ``connect_async``): connect it now, and reconnect
        it whenever the connection is lost."""
        link = _Link(client)

        def on_close(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            with self._lock:  # before paho closes it: its number may be reused at once
                if link.sock is sock:
                    self._selector.unregister(sock)
                    link.sock = None
                    self._pending.discard(link)

        def on_write(_c: mqtt.Client, _u: Any, _sock: Any) -> None:
            with self._lock:
                self._dirty.add(link)
            if threading.current_thread() is not self._thread:
                self._wake()

        client.on_socket_close = on_close
        client.on_socket_register_write = on_write
        client.on_socket_unregister_write = on_write
        with self._lock:
            self._links[id(client)] = link
            self._schedule(link, time.monotonic())
        self._wake()

    def leave(self, client: mqtt.Client) -> threading.Event:
        """Stop reconnecting ``client`` (call after its ``disconnect``): its DISCONNECT is
        still written. The event is set once the loop has let go of it."""
        with self._lock:
            link = self._links.get(id(client))
            if link is None:
                done = threading.Event()
                done.set()
                return done
            link.leaving = True
        self._wake()
        return link.gone

    def close(self, timeout: float = 2.0) -> None:
        """End both threads; a socket still open is closed (the process is ending)."""
        self._closing = True
        with self._connect_ready:
            self._to_connect.appendleft(None)
            self._connect_ready.notify()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._connector.is_alive():
            self._connector.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already awake (a full pipe), or closed
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------ the connect thread

    def _connect_forever(self) -> None:
        while True:
            with self._connect_ready:
                self._connect_ready.wait_for(lambda: bool(self._to_connect))
                link = self._to_connect.popleft()
            if link is None:
                return
            client = link.client
            if not link.leaving and not _wants_out(client):
                try:
                    client.reconnect()
                except OSError:
                    client._handle_on_connect_fail()  # as paho's loop: on_connect_fail
                except Exception as error:  # paho's own thread would die of it, silently
                    log.error("mqtt.connect_crashed", error=f"{type(error).__name__}: {error}")
            with self._lock:
                self._attempted.append(link)
            self._wake()

    # ------------------------------------------------------------ the network thread

    def _schedule(self, link: _Link, when: float) -> None:
        link.due = when
        heapq.heappush(self._timers, (when, next(self._order), link))

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY
        try:
            while not self._closing:
                now = time.monotonic()
                with self._lock:
                    soonest = min(next_misc, self._timers[0][0] if self._timers else next_misc)
                    busy = bool(self._pending or self._attempted or self._dirty)
                timeout = 0.0 if busy else max(0.0, min(MISC_EVERY, soonest - now))
                for key, events in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                        continue
                    link = key.data
                    if events & READ:
                        self._call(link, link.client.loop_read)
                    if events & WRITE and link.sock is key.fileobj:
                        self._call(link, link.client.loop_write)
                now = time.monotonic()
                self._settle(now)
                if now >= next_misc:
                    for link in list(self._links.values()):
                        self._call(link, link.client.loop_misc)
                    next_misc = now + MISC_EVERY
                self._update_interest()
        finally:
            self._shut()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._wake_r.recv(4096):
                pass

    def _call(self, link: _Link, operation: Any) -> None:
        """One of paho's loop calls on a client whose socket this thread owns; then, if
        the socket went away, reconnect later or let go."""
        if link.sock is None or link.connecting:
            return
        sock = link.sock
        try:
            operation()
        except Exception as error:  # a callback raised: paho's own thread would end (for
            # that client alone); here every client shares the thread, so it goes on
            log.error(
                "mqtt.callback_failed",
                client_id=link.client._client_id.decode(errors="replace"),
                error=f"{type(error).__name__}: {error}",
            )
        if link.sock is not None and getattr(sock, "pending", None) and sock.pending() > 0:
            with self._lock:
                self._pending.add(link)
        if link.client.socket() is None:
            self._lost(link, time.monotonic())

    def _lost(self, link: _Link, now: float) -> None:
        with self._lock:
            if link.sock is not None:  # closed without on_socket_close: unregister anyway
                self._selector.unregister(link.sock)
                link.sock = None
            if link.leaving or _wants_out(link.client):
                self._let_go(link)
            else:
                self._schedule(link, now + _next_delay(link.client))

    def _let_go(self, link: _Link) -> None:
        link.due = None
        self._links.pop(id(link.client), None)
        self._pending.discard(link)
        link.gone.set()

    def _settle(self, now: float) -> None:
        """Attempts that ended, TLS bytes already decrypted, clients that are leaving,
        and connect attempts now due."""
        with self._lock:
            attempted = list(self._attempted)
            self._attempted.clear()
        for link in attempted:
            link.connecting = False
            sock = link.client.socket()
            if sock is None:
                self._lost(link, now)
                continue
            with self._lock:
                self._selector.register(sock, READ, link)
                link.sock = sock
                self._dirty.add(link)
            if link.leaving and not _wants_out(link.client):
                link.client.disconnect()  # stopped while connecting: say goodbye
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
        for link in pending:
            self._call(link, link.client.loop_read)
        for link in [link for link in list(self._links.values()) if link.leaving]:
            if link.sock is None and not link.connecting:
                with self._lock:
                    self._let_go(link)
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    break
                when, _, link = heapq.heappop(self._timers)
                if link.due != when or link.connecting or link.leaving:
                    continue  # stale, or let go
                link.due = None
                link.connecting = True
            with self._connect_ready:
                self._to_connect.append(link)
                self._connect_ready.notify()

    def _update_interest(self) -> None:
        """Watch for writability exactly while paho has something to send."""
        with self._lock:
            dirty = list(self._dirty)
            self._dirty.clear()
            for link in dirty:
                if link.sock is not None:
                    wanted = READ | (WRITE if link.client.want_write() else 0)
                    if self._selector.get_key(link.sock).events != wanted:
                        self._selector.modify(link.sock, wanted, link)

    def _shut(self) -> None:
        with self._lock:
            for link in list(self._links.values()):
                if link.sock is not None:
                    self._selector.unregister(link.sock)
                    link.sock.close()
                    link.sock = None
                self._let_go(link)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
