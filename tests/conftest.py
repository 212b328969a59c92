"""Shared fixtures: a real mosquitto from the project's config, and fedmq child processes.

Everything a fixture starts it also stops, by PID, even when the test fails.
"""

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from fedmq.broker.process import Mosquitto
from fedmq.datasets import Dataset, digits, partition
from fedmq.schemas import decode_global, decode_metrics, decode_status


@pytest.fixture(autouse=True)
def _structlog_as_found(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests that run the CLI in-process (``fedmq.cli.main``) configure structlog as a
    command does: a level filter (``--log-level``) and each module's logger cached on
    first use. Left in place, that hides later tests' events from ``capture_logs`` (seen:
    test_aggregator_server's log assertions failing after test_plot). Here no logger
    caches, and each test ends with structlog's defaults back."""
    configure = structlog.configure

    def uncached(**settings: object) -> None:
        configure(**{**settings, "cache_logger_on_first_use": False})  # type: ignore[arg-type]

    monkeypatch.setattr(structlog, "configure", uncached)
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """One broker for the session, started from mosquitto.conf on a free loopback port."""
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def federation() -> str:
    """A fresh federation id, so tests sharing the broker never see each other's topics."""
    return f"t-{uuid.uuid4().hex[:12]}"


class Child:
    def __init__(self, name: str, args: list[str], log: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedmq", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cwd,  # default state dirs (.fedmq-node, .fedmq-aggregator) land here
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout} s; log:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    """``spawn(name, *args)`` runs ``python -m fedmq *args``; all are stopped at teardown."""
    children: list[Child] = []

    def start(name: str, *args: str) -> Child:
        child = Child(name, list(args), tmp_path / f"{name}.log", cwd=tmp_path)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


@pytest.fixture(scope="session")
def digits_split() -> tuple[Dataset, Dataset]:
    return digits()


@pytest.fixture
def node_data(tmp_path: Path, digits_split: tuple[Dataset, Dataset]):  # type: ignore[no-untyped-def]
    """``node_data(count)`` writes ``count`` IID shards as .npz files and returns their paths."""

    def write(count: int) -> list[Path]:
        train, _ = digits_split
        paths = []
        for index, shard in enumerate(partition(train.y, count, "iid", 0)):
            path = tmp_path / f"node-{index}.npz"
            np.savez(path, x=train.x[shard], y=train.y[shard])
            paths.append(path)
        return paths

    return write


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def metrics_rounds(payloads: list[bytes]) -> set[int]:
    """The rounds the ``metrics`` messages among ``payloads`` are of (``Collector.wait_on``)."""
    return {decode_metrics(payload).round for payload in payloads}


def through(rounds: int) -> Callable[[list[bytes]], bool]:
    """``Collector.wait_on``'s test for the metrics of rounds 1 to ``rounds`` (at least)."""
    return lambda payloads: metrics_rounds(payloads) >= set(range(1, rounds + 1))


def at_least(count: int) -> Callable[[list[bytes]], bool]:
    """``Collector.wait_on``'s test for ``count`` messages or more."""
    return lambda payloads: len(payloads) >= count


def ends_final(payloads: list[bytes]) -> bool:
    """``Collector.wait_on``'s test for global models: the last one is the final model."""
    return bool(payloads) and bool(payloads[-1]) and decode_global(payloads[-1]).final


def has_final(payloads: list[bytes]) -> bool:
    """``Collector.wait_on``'s test for global models: the final model is among them."""
    return any(payload and decode_global(payload).final for payload in payloads)


def ends_in(state: str) -> Callable[[list[bytes]], bool]:
    """``Collector.wait_on``'s test for a node's status messages: the last one is ``state``."""
    return lambda payloads: bool(payloads) and decode_status(payloads[-1]).state == state


class Collector:
    """A raw paho client (no fedmq code on the receiving side) that keeps what it gets."""

    def __init__(self, address: tuple[str, int], topics: list[str]) -> None:
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex}"
        )

        def on_connect(client, _u, _f, reason, _p):  # type: ignore[no-untyped-def]
            client.subscribe([(topic, 1) for topic in topics])

        def on_subscribe(*_args):  # type: ignore[no-untyped-def]
            self._subscribed.set()

        def on_message(_c, _u, message):  # type: ignore[no-untyped-def]
            with self._lock:
                self.messages.append((message.topic, bytes(message.payload), message.retain))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(*address)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("collector could not subscribe")

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def wait_on(
        self, topic: str, enough: Callable[[list[bytes]], bool], what: str, timeout: float = 10.0
    ) -> list[bytes]:
        """The payloads on ``topic`` once ``enough`` says they are: for reading what the
        broker is known to have, from a child that exited (its publishes acknowledged) or
        from another subscriber's copy. mosquitto delivers to each subscriber on its own,
        so this one's copy may still be on its way."""
        wait_until(lambda: enough(self.on(topic)), timeout, what)
        return self.on(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collect(mosquitto: Mosquitto) -> Iterator[object]:
    """``collect([topic filters])`` subscribes a raw paho client; closed at teardown."""
    collectors: list[Collector] = []

    def make(topics: list[str]) -> Collector:
        collector = Collector((mosquitto.host, mosquitto.port), topics)
        collectors.append(collector)
        return collector

    yield make
    for collector in collectors:
        collector.close()


def child_pids(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc: Linux only), for tests that check or end
    the processes a process they started has started."""
    listed = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if listed:
        return [int(c) for path in listed for c in path.read_text().split()]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def mosquitto_workdir(pid: int) -> Path:
    """The temporary directory of a mosquitto started by ``Mosquitto`` (its ``-c`` file's
    folder), for a test that kills that object's owner and so must remove it itself."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"-c") + 1].decode()).parent


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
