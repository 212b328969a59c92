"""A round's burst of updates through a real mosquitto to a real aggregator: how long
the broker takes to accept 1,000 updates sent in the same instant, and how many it
drops with mosquitto's default queue settings against the project's mosquitto.conf.

    .venv/bin/python bench/broker_burst.py [--nodes 1000] [--repeats 3]

The simulated nodes are paho clients in one thread driven by one ``selectors`` loop
(paho's external-loop API), so a thousand of them cost a thousand sockets, not a
thousand threads. Each sends one valid dense update of round 1 at QoS 1; "accepted" is
the time from the first publish to the last PUBACK. "dropped" is the broker's own count
(``$SYS/broker/publish/messages/dropped``, before and after the burst): updates it
acknowledged to their node and never delivered. "received" is the number of
participants in the aggregator's report of round 1.

With the default settings the aggregator is started with a deadline (``--min-nodes 1
--round-timeout``) so that it reports what it got; with the project's config it waits
for every node. tests/faults/test_burst.py runs the same burst once and asserts on it.
"""

import argparse
import contextlib
import json
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from fedmq.broker.process import PROJECT_CONF, Mosquitto
from fedmq.schemas import GlobalModel, NodeUpdate, Topics, decode_global, encode
from fedmq.schemas.sys_topics import DROPPED, parse_counter

UPTIME = "$SYS/broker/uptime"  # republished at every $SYS tick: a clock for the others
QUEUE_SETTINGS = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages",
                  "max_inflight_bytes")  # fmt: skip


def default_queue_config(template: str) -> str:
    """The project's config without its queue settings, so mosquitto's defaults apply
    (max_queued_messages 1000, max_inflight_messages 20, no byte limits)."""
    pattern = re.compile(rf"^[ \t]*({'|'.join(QUEUE_SETTINGS)})[ \t].*\n?", re.MULTILINE)
    return pattern.sub("", template)


class Swarm:
    """Many paho clients, one socket each, driven by one selectors loop in this thread."""

    def __init__(self, host: str, port: int, client_ids: Sequence[str]) -> None:
        self.host, self.port = host, port
        self._selector = selectors.DefaultSelector()
        self.clients = [self._client(index, cid) for index, cid in enumerate(client_ids)]
        self._others: list[mqtt.Client] = []  # driven here too, not simulated nodes (drive)
        self.connected: set[int] = set()
        self.acks: list[float] = []  # monotonic time of every PUBACK
        self.lost: dict[int, str] = {}  # client index -> why its connection ended
        self._next_misc = 0.0

    def _client(self, index: int, client_id: str) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            userdata=index,
        )
        client.max_queued_messages_set(0)
        self._loop_callbacks(client)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        return client

    def _loop_callbacks(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def drive(self, client: mqtt.Client) -> mqtt.Client:
        """Run ``client`` (not a simulated node; connect it after this call) in this loop
        too. Any client this process opens while the swarm is connected must: its socket's
        number is above 1,000, and paho's own loop (``loop_start``) waits in ``select()``,
        which refuses descriptors from 1,024 (FD_SETSIZE) on; paho takes that for a lost
        connection and reconnects for ever without reading a byte. In a long pytest run
        the process holds enough other files to get there (the burst test's "no global
        model within 60 s" in CI)."""
        self._loop_callbacks(client)
        self._others.append(client)
        return client

    # paho's external-loop callbacks: keep the selector in step with each socket
    def _on_socket_open(self, client: mqtt.Client, _index: int, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, _client: mqtt.Client, _index: int, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # already gone
            self._selector.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, _index: int, sock: Any) -> None:
        self._modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: mqtt.Client, _index: int, sock: Any) -> None:
        self._modify(sock, selectors.EVENT_READ, client)

    def _modify(self, sock: Any, events: int, client: mqtt.Client) -> None:
        with contextlib.suppress(KeyError, ValueError):  # closed, or not registered yet
            self._selector.modify(sock, events, client)

    def _on_connect(self, _c: mqtt.Client, index: int, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.lost[index] = f"connect refused: {reason}"
        else:
            self.connected.add(index)

    def _on_publish(self, _c: mqtt.Client, _i: int, _mid: int, _rc: Any, _p: Any) -> None:
        self.acks.append(time.monotonic())

    def _on_disconnect(self, _c: mqtt.Client, index: int, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.discard(index)
        if reason.is_failure:
            self.lost.setdefault(index, str(reason))

    def pump(self, timeout: float) -> None:
        """One pass of the loop: read and write what is ready, keepalives once a second."""
        for key, events in self._selector.select(timeout):
            client = key.data
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        now = time.monotonic()
        if now >= self._next_misc:
            self._next_misc = now + 1.0
            for client in [*self.clients, *self._others]:
                client.loop_misc()

    def pump_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not done after {timeout} s")
            self.pump(0.05)

    def connect(self, *, batch: int = 100, timeout: float = 60.0) -> None:
        """Connect every client, ``batch`` at a time (mosquitto's listen backlog is 100)."""
        for start in range(0, len(self.clients), batch):
            for client in self.clients[start : start + batch]:
                client.connect(self.host, self.port, keepalive=60)
            wanted = min(start + batch, len(self.clients))
            self.pump_until(
                lambda wanted=wanted: len(self.connected) + len(self.lost) >= wanted,
                timeout,
                f"CONNACK for {wanted} clients",
            )
        if self.lost:
            raise RuntimeError(f"{len(self.lost)} clients could not connect: {self.lost}")

    def publish_all(
        self, messages: Sequence[tuple[str, bytes]], *, copies: int = 1, timeout: float
    ) -> float:
        """Client i publishes message i at QoS 1 (``copies`` times, as a node resends
        after a reconnect), all at once; then wait for every PUBACK or a lost
        connection. Returns the seconds from the first publish to the last PUBACK."""
        self.acks.clear()
        started = time.monotonic()
        for client, (topic, payload) in zip(self.clients, messages, strict=True):
            for _ in range(copies):
                client.publish(topic, payload, qos=1)
            client.loop_write()  # on the wire now, not at the next select
        wanted = len(messages) * copies
        self.pump_until(lambda: len(self.acks) >= wanted or bool(self.lost), timeout, "PUBACKs")
        if self.lost:
            raise RuntimeError(f"{len(self.lost)} clients lost their connection: {self.lost}")
        return max(self.acks, default=started) - started

    def close_client(self, client: mqtt.Client) -> None:
        """Disconnect one client of this loop (a node or one it ``drive``s)."""
        if client.socket() is not None:
            client.disconnect()
            client.loop_write()
        sock = client.socket()
        if sock is not None:  # DISCONNECT not written: close it ourselves
            self._on_socket_close(client, 0, sock)
            sock.close()

    def close(self) -> None:
        for client in [*self.clients, *self._others]:
            self.close_client(client)
        self._selector.close()


class SysWatcher:
    """One paho client (its own network thread) that follows the dropped counter and
    the $SYS ticks."""

    def __init__(self, host: str, port: int) -> None:
        self._changed = threading.Condition()
        self.dropped: int | None = None
        self.ticks = 0
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"burst-sys-{uuid.uuid4().hex[:8]}"
        )
        self._client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe([(DROPPED, 1), (UPTIME, 1)])
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            if message.topic == DROPPED:
                self.dropped = parse_counter(message.payload)
            elif not message.retain:
                self.ticks += 1
            self._changed.notify_all()

    def current(self, timeout: float = 10.0) -> int:
        """The counter now (mosquitto publishes "0", retained, when it starts)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.dropped is not None, timeout):
                raise TimeoutError(f"no {DROPPED} within {timeout} s")
            assert self.dropped is not None
            return self.dropped

    def after_ticks(self, ticks: int = 2, timeout: float = 15.0) -> int:
        """The counter once ``ticks`` more $SYS updates have come: whatever it counted
        before this call has been published by then (uptime leads each tick)."""
        with self._changed:
            wanted = self.ticks + ticks
            if not self._changed.wait_for(lambda: self.ticks >= wanted, timeout):
                raise TimeoutError(f"fewer than {ticks} $SYS updates in {timeout} s")
        return self.current()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def fetch_global(swarm: Swarm, federation: str, timeout: float = 60.0) -> GlobalModel:
    """The retained global model of ``federation``, waiting until there is one: read by
    one more client in ``swarm``'s loop (``Swarm.drive`` says why not in a thread of its
    own), which also keeps the simulated nodes' connections serviced meanwhile."""
    arrived: list[bytes] = []

    def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.payload:
            arrived.append(bytes(message.payload))

    client = swarm.drive(
        mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"burst-g-{uuid.uuid4().hex[:8]}")
    )
    client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(Topics(federation).global_model, 1)
    client.on_message = on_message
    client.connect(swarm.host, swarm.port)
    try:
        try:
            swarm.pump_until(lambda: bool(arrived), timeout, "global model")
        except TimeoutError:
            state = "connected" if client.is_connected() else "not connected"
            raise TimeoutError(
                f"no global model for {federation} within {timeout} s (its reader {state})"
            ) from None
        return decode_global(arrived[0])
    finally:
        swarm.close_client(client)


def node_id(index: int) -> str:
    return f"node-{index:04d}"


def build_updates(model: GlobalModel, count: int, *, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` valid dense updates of the global's round, as ``node/app.py`` builds
    them (a random delta instead of a trained one)."""
    rng = np.random.default_rng(seed)
    topics = Topics(model.federation)
    updates = []
    for index in range(count):
        delta = {
            name: rng.normal(0.0, 0.01, array.shape).astype(np.float32)
            for name, array in model.params.items()
        }
        update = NodeUpdate(
            federation=model.federation,
            node_id=node_id(index),
            round=model.round,
            base_model_id=model.model_id,
            num_examples=150,
            train_loss=1.0,
            train_seconds=0.0,
            delta=delta,
            compression="dense",
            sent_at=time.time(),
        )
        updates.append((topics.update(node_id(index)), encode(update)))
    return updates


class Aggregator:
    """``python -m fedmq aggregator`` for one round; stopped by its PID on exit."""

    def __init__(self, broker: Mosquitto, federation: str, nodes: int, workdir: Path,
                 *, round_timeout: float | None = None) -> None:  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        self.report_path = workdir / "report.json"
        self.log_path = workdir / "aggregator.log"
        args = ["--broker", broker.address, "--federation", federation, "--nodes", str(nodes),
                "--rounds", "1", "--test-data", "none", "--report", str(self.report_path),
                "--log-json"]  # fmt: skip
        if round_timeout is not None:
            args += ["--min-nodes", "1", "--round-timeout", str(round_timeout)]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedmq", "aggregator", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,  # its state directory lands here
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def report(self, timeout: float) -> dict[str, Any]:
        """The report.json it writes at exit (waiting up to ``timeout`` for the exit)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"aggregator still running after {timeout} s") from None
        if code != 0 or not self.report_path.exists():
            raise RuntimeError(f"aggregator exited {code}: {self.log()[-3000:]}")
        report: dict[str, Any] = json.loads(self.report_path.read_text())
        return report

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Aggregator":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Burst:
    nodes: int
    copies: int  # updates per node (2: each node also sends the copy a reconnect causes)
    acked: int  # PUBACKs the nodes received
    seconds: float  # first publish to last PUBACK
    dropped: int  # the broker's dropped counter, after minus before
    received: int  # participants of round 1 in the aggregator's report
    report: dict[str, Any]


def run_burst(broker: Mosquitto, nodes: int, workdir: Path, *, copies: int = 1,
              round_timeout: float | None = None) -> Burst:  # fmt: skip
    """Connect ``nodes`` simulated nodes, start an aggregator expecting them, and send
    every node's round-1 update (``copies`` times) in the same instant."""
    federation = f"burst-{uuid.uuid4().hex[:8]}"
    # Before the swarm: its own paho thread waits in select(), which needs its socket
    # numbered below 1,024 (Swarm.drive).
    watcher = SysWatcher(broker.host, broker.port)
    swarm = Swarm(broker.host, broker.port, [f"{federation}-{node_id(i)}" for i in range(nodes)])
    try:
        swarm.connect()
        before = watcher.current()
        # The aggregator starts once the nodes are connected, so a deadline counts from
        # about the moment of the burst.
        with Aggregator(broker, federation, nodes, workdir, round_timeout=round_timeout) as agg:
            try:
                model = fetch_global(swarm, federation)
            except TimeoutError as error:  # say why: the aggregator's status and its log
                status = agg.process.poll()
                raise TimeoutError(
                    f"{error}; aggregator {'running' if status is None else f'exited {status}'},"
                    f" its log ends:\n{agg.log()[-3000:]}\nmosquitto's log ends:\n"
                    f"{broker.log_path.read_text(errors='replace')[-2000:]}\n"
                    f"connected simulated nodes {len(swarm.connected)}, lost {len(swarm.lost)}"
                ) from None
            messages = build_updates(model, nodes)
            seconds = swarm.publish_all(messages, copies=copies, timeout=60)
            report = agg.report(timeout=60 + (round_timeout or 0))
        after = watcher.after_ticks()
        [first] = report["rounds"]
        received = first["participants"]
        return Burst(nodes, copies, len(swarm.acks), seconds, after - before, received, report)
    finally:
        swarm.close()
        watcher.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per case (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmq-burst-") as tmp:
        default_conf = Path(tmp) / "default-queues.conf"
        default_conf.write_text(default_queue_config(PROJECT_CONF.read_text()))
        print(f"{args.nodes} nodes, dense digits-mlp updates (9,971 B) at QoS 1, all at once;")
        print("copies 2: every node also sends the copy a reconnect makes it resend\n")
        print(f"{'config':<18} {'copies':>6} {'messages':>8} {'accepted s (median, runs)':<34} "
              f"{'PUBACKs':>8} {'dropped':>14} {'received':>13}")  # fmt: skip
        cases = [("project", PROJECT_CONF, None), ("mosquitto default", default_conf, 10.0)]
        for name, conf, timeout in cases:
            for copies in (1, 2):
                bursts = []
                for run in range(args.repeats):
                    with Mosquitto(config=conf) as broker:  # a fresh broker: counters from 0
                        bursts.append(run_burst(broker, args.nodes, Path(tmp) / f"{name}-{copies}-{run}",
                                                copies=copies, round_timeout=timeout))  # fmt: skip
                times = " ".join(f"{b.seconds:.3f}" for b in bursts)
                median = statistics.median(b.seconds for b in bursts)
                dropped = "/".join(str(b.dropped) for b in bursts)
                received = "/".join(str(b.received) for b in bursts)
                acked = (
                    "/".join(str(b.acked) for b in bursts)
                    if len({b.acked for b in bursts}) > 1
                    else str(bursts[0].acked)
                )
                print(f"{name:<18} {copies:>6} {args.nodes * copies:>8} {median:.3f} ({times}){'':<{max(0, 25 - len(times))}} "
                      f"{acked:>8} {dropped:>14} {received:>13}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
