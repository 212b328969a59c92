"""``fedmq demo``: a real federation on one machine.

Its own mosquitto (or ``--broker``), one aggregator process and N node processes, each its
own MQTT client as on separate devices, all on loopback. The demo watches the public
metrics topic like any monitoring script, shows progress, and writes report.json. Every
child runs in its own session and is ended by PID on exit, Ctrl-C or a child's failure.
"""

import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from broker.process import Mosquitto
from fedmq import mqtt as edge
from fedmq.datasets import Dataset, digits, partition
from fedmq.report import build_report, write_report
from schemas import RoundMetrics, SchemaError, Topics, decode_metrics

log = structlog.get_logger()


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    nodes: int = 10
    rounds: int = 30
    seed: int = 0
    model: str = "digits-mlp"
    partition: str = "iid"
    compression: str = "dense"
    report: Path | None = None
    broker: edge.BrokerAddress | None = None
    federation: str = "demo"
    workdir: Path | None = None
    round_timeout: float | None = None
    start_timeout: float = 120.0


class ChildFailed(RuntimeError):
    pass


class Children:
    """Child processes started by the demo, each logging to its own file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, args: list[str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as log_file:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedmq", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check(self, *, allowed_to_exit: set[str]) -> None:
        """Raise if a child ended with an error, or ended when it should still be running."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and (code != 0 or name not in allowed_to_exit):
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-1500:]
                raise ChildFailed(f"{name} (pid {proc.pid}) exited with {code}:\n{tail}")

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_node_data(config: DemoConfig, directory: Path) -> tuple[list[Path], Path]:
    """Split the reference data as the task prescribes; one .npz per node plus the test set."""
    train, test = digits()
    paths = []
    for index, shard in enumerate(partition(train.y, config.nodes, config.partition, config.seed)):
        path = directory / f"node-{index + 1:02d}.npz"
        Dataset(train.x[shard], train.y[shard]).save(path)
        paths.append(path)
    test_path = directory / "test.npz"
    test.save(test_path)
    return paths, test_path


class Progress:
    """One line per round; rewritten in place on a terminal."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()

    def round(self, m: RoundMetrics) -> None:
        acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
        line = (
            f"round {m.round:>3}/{self.total}  accuracy {acc}  nodes {len(m.participants):>3}"
            f"  up {m.uplink_bytes:>8} B  down {m.downlink_bytes:>8} B  {m.seconds * 1000:8.1f} ms"
        )
        if self.tty:
            self.out.write("\r" + line + ("\n" if m.round == self.total else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def run(config: DemoConfig, stop: threading.Event, out: TextIO = sys.stdout) -> int:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="fedmq-demo-"))
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    broker = None if config.broker else Mosquitto()
    children = Children(workdir / "logs")
    client = None
    started = time.monotonic()
    try:
        node_paths, test_path = write_node_data(config, workdir / "data")
        if broker is not None:
            broker.start()
        address = config.broker or edge.BrokerAddress(broker.host, broker.port)  # type: ignore[union-attr]
        topics = Topics(config.federation)
        inbox: queue.Queue[edge.Received] = queue.Queue()
        ready = threading.Event()
        client = edge.make_client(
            edge.make_client_id(config.federation, "demo", edge.unique_suffix()),
            subscriptions=[(topics.metrics, 1)],
            inbox=inbox,
            ready=ready,
        )
        edge.start(client, address)
        if not ready.wait(10):
            raise ChildFailed(f"could not subscribe at the broker {address}")
        out.write(
            f"fedmq demo: {config.nodes} nodes, {config.rounds} rounds, model {config.model}, "
            f"partition {config.partition}, compression {config.compression},\n"
            f"broker {address}, logs in {workdir / 'logs'}\n"
        )
        common = ["--broker", str(address), "--federation", config.federation]
        aggregator_args = [
            "aggregator",
            *common,
            "--model",
            config.model,
            "--nodes",
            str(config.nodes),
            "--rounds",
            str(config.rounds),
            "--seed",
            str(config.seed),
            "--test-data",
            str(test_path),
            "--compression",
            config.compression,
            "--log-json",
        ]
        if config.round_timeout is not None:
            aggregator_args += ["--round-timeout", str(config.round_timeout)]
        children.spawn("aggregator", aggregator_args)
        for index, path in enumerate(node_paths):
            node_id = f"node-{index + 1:02d}"
            children.spawn(
                node_id,
                [
                    "node",
                    *common,
                    "--node-id",
                    node_id,
                    "--data",
                    str(path),
                    "--state-dir",
                    str(workdir / node_id),
                    "--exit-when-done",
                    "--log-json",
                ],
            )
        progress = Progress(config.rounds, out)
        rounds: dict[int, RoundMetrics] = {}
        while len(rounds) < config.rounds:
            if stop.is_set():
                out.write("\ninterrupted; stopping every process the demo started\n")
                return 130
            children.check(allowed_to_exit=set())
            if not rounds and time.monotonic() - started > config.start_timeout:
                raise ChildFailed(f"no round finished within {config.start_timeout:.0f} s")
            try:
                received = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if received.topic == edge.CONNECTED:
                continue
            try:
                metrics = decode_metrics(received.payload)
            except SchemaError as error:
                log.warning("demo.bad_metrics", reason=str(error))
                continue
            if metrics.round not in rounds:
                rounds[metrics.round] = metrics
                progress.round(metrics)
        if not children.wait_all(timeout=30):
            raise ChildFailed("processes did not exit after the last round")
        children.check(allowed_to_exit=set(children.procs))
        total = time.monotonic() - started
        report = build_report(
            list(rounds.values()),
            federation=config.federation,
            model=config.model,
            nodes=config.nodes,
            rounds_requested=config.rounds,
            partition=config.partition,
            compression=config.compression,
            seed=config.seed,
            total_seconds=total,
        )
        print_summary(report, out)
        if config.report is not None:
            write_report(config.report, report)
            out.write(f"report written to {config.report}\n")
        return 0
    except ChildFailed as error:
        out.write(f"\nfedmq demo failed: {error}\n")
        return 1
    finally:
        children.stop_all()
        if client is not None:
            edge.stop(client)
        if broker is not None:
            broker.stop()
        if config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def print_summary(report: dict[str, Any], out: TextIO) -> None:
    rows = report["rounds"]
    seconds = [r["seconds"] for r in rows]
    warm = seconds[1:] or seconds
    out.write(
        f"final test accuracy {report['final_accuracy']:.4f} after {len(rows)} rounds"
        f" in {report['total_seconds']:.1f} s\n"
        f"median round {statistics.median(warm) * 1000:.1f} ms (after round 1),"
        f" uplink {statistics.mean(r['uplink_bytes'] for r in rows):.0f} B/round,"
        f" downlink {statistics.mean(r['downlink_bytes'] for r in rows):.0f} B/round\n"
    )
