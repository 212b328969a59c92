"""Many nodes on one machine: what one aggregator and one mosquitto carry as the fleet grows.

    .venv/bin/python bench/many_nodes.py [--sizes 10,100,1000,1500] [--per-process 100]
                                         [--rounds 5] [--monitor]

For each N a real federation (``fedmq demo --nodes N --nodes-per-process K``, K = min(N,
--per-process)) on its own mosquitto, started here so that its PID and ``$SYS`` counters are
ours to read. Measured per N:

- median round wall time: between the metrics of consecutive rounds (aggregator clock),
  rounds 2.. (round 1 holds process start-up and the JIT compile);
- aggregator CPU per update (rounds: at least enough for 1,000 updates after round 1, as
  the kernel counts CPU in 10 ms ticks): utime + stime of the aggregator process (``/proc/PID/stat``)
  from the close of round 1 to the close of the last round, over the updates accepted in
  rounds 2..; sampled every 0.1 s, so each end is within 0.1 s of the close;
- aggregator and mosquitto peak RSS: ``VmHWM`` of ``/proc/PID/status`` at the end;
- messages per round: the PUBLISHes on the federation's topics (``fedmq/<id>/#``, as a
  QoS 0 subscriber to all of them receives them) from the close of round 1 to the close of
  the last round, per round, in all and of them node status messages (mosquitto's
  ``$SYS/broker/publish/messages/received`` does not count retained publishes, so it
  misses every status: not used);
- participants per round (min), updates rejected and ``broker_dropped`` (from report.json).

With ``--monitor``, a ``fedmq monitor`` (plain lines, not a terminal) watches each run; its
CPU seconds and the lines it printed are reported. Past the digits data's 1,500 training
samples (the demo's built-in split stops there) N nodes get a ``--data-dir`` of node files
drawn from those samples with replacement, 4 examples each; the table says which.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from fedmq import logs
from fedmq.broker.process import Mosquitto
from fedmq.datasets import DIGITS_TRAIN, Dataset, digits
from fedmq.demo import DemoSettings, run
from fedmq.mqtt import BrokerAddress

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for path in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(c) for c in path.read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def is_aggregator(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[1:4] == [b"-m", b"fedmq", b"aggregator"]


@dataclass
class Samples:
    """What the sampler thread saw: (wall time, value) series."""

    aggregator_cpu: list[tuple[float, float]] = field(default_factory=list)
    aggregator_rss: float | None = None
    broker_rss: float | None = None
    messages: list[tuple[float, bool]] = field(default_factory=list)  # (time, is a status)


def sample(broker_pid: int, samples: Samples, done: threading.Event) -> None:
    aggregator = None
    while not done.wait(0.1):
        if aggregator is None:
            aggregator = next((p for p in descendants(os.getpid()) if is_aggregator(p)), None)
        if aggregator is not None:
            cpu = cpu_seconds(aggregator)
            if cpu is not None:
                samples.aggregator_cpu.append((time.time(), cpu))
                samples.aggregator_rss = peak_rss_mib(aggregator) or samples.aggregator_rss
        samples.broker_rss = peak_rss_mib(broker_pid) or samples.broker_rss


def watch_messages(broker: Mosquitto, federation: str, samples: Samples) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex}")
    subscribed = threading.Event()
    status = f"fedmq/{federation}/status/"

    def on_connect(c, _u, _f, _r, _p):  # type: ignore[no-untyped-def]
        c.subscribe(f"fedmq/{federation}/#", 0)

    def on_subscribe(*_args):  # type: ignore[no-untyped-def]
        subscribed.set()

    def on_message(_c, _u, message):  # type: ignore[no-untyped-def]
        samples.messages.append((time.time(), message.topic.startswith(status)))

    client.on_subscribe = on_subscribe

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("the message counter could not subscribe")
    return client


def at_or_after(series: list[tuple[float, float]], when: float) -> float | None:
    later = [value for at, value in series if at >= when]
    return later[0] if later else None


def resampled_data(directory: Path, nodes: int, per_node: int = 4) -> Path:
    """``nodes`` node files of ``per_node`` digits training examples drawn with replacement
    (seed 0), and the digits test set: for fleets larger than the built-in split."""
    train, test = digits()
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(nodes):
        pick = rng.integers(0, len(train.y), per_node)
        Dataset(train.x[pick], train.y[pick]).save(directory / f"node-{index + 1:05d}.npz")
    test.save(directory / "test.npz")
    return directory


def measure(nodes: int, per_process: int, rounds: int, monitor: bool, tmp: Path) -> dict:
    rounds = max(rounds, 1 + -(-1000 // nodes))
    samples = Samples()
    done = threading.Event()
    federation = f"bench{nodes}"
    data_dir = None if nodes <= DIGITS_TRAIN else resampled_data(tmp / f"data{nodes}", nodes)
    with Mosquitto() as broker:
        assert broker.pid is not None
        sys_client = watch_messages(broker, federation, samples)
        watcher = None
        if monitor:
            watcher = subprocess.Popen(
                [sys.executable, "-m", "fedmq", "monitor", "--broker", broker.address,
                 "--federation", federation],
                stdout=(tmp / f"monitor{nodes}.txt").open("wb"), stderr=subprocess.DEVNULL,
            )  # fmt: skip
        sampler = threading.Thread(target=sample, args=(broker.pid, samples, done), daemon=True)
        sampler.start()
        report_path = tmp / f"report{nodes}.json"
        config = DemoSettings(
            nodes=None if data_dir is not None else nodes,
            data_dir=data_dir,
            nodes_per_process=min(nodes, per_process),
            rounds=rounds,
            federation=federation,
            broker=BrokerAddress(broker.host, broker.port),
            report=report_path,
            workdir=tmp / f"run{nodes}",
        )
        started = time.monotonic()
        with open(tmp / f"demo{nodes}.txt", "w") as out:
            status = run(config, threading.Event(), out=out)
        wall = time.monotonic() - started
        done.set()
        sampler.join()
        monitor_cpu = monitor_lines = None
        if watcher is not None:
            time.sleep(1.5)  # the last round's lines
            monitor_cpu = cpu_seconds(watcher.pid)
            watcher.terminate()
            watcher.wait(10)
            monitor_lines = len((tmp / f"monitor{nodes}.txt").read_text().splitlines())
        sys_client.disconnect()
        sys_client.loop_stop()
    if status != 0:
        raise SystemExit(
            f"{nodes} nodes: the demo failed: {(tmp / f'demo{nodes}.txt').read_text()}"
        )
    rows = json.loads(report_path.read_text())["rounds"]
    first, last = rows[0]["at"], rows[-1]["at"]
    walls = [b["at"] - a["at"] for a, b in itertools.pairwise(rows)]
    updates = sum(row["participants"] for row in rows[1:])
    cpu_first = at_or_after(samples.aggregator_cpu, first)
    cpu_last = at_or_after(samples.aggregator_cpu, last)
    counted = [is_status for at, is_status in samples.messages if first < at <= last]
    return {
        "nodes": nodes,
        "rounds": rounds,
        "per_process": min(nodes, per_process),
        "data": "resampled" if data_dir is not None else "split",
        "median_round_s": statistics.median(walls),
        "first_round_s": rows[0]["seconds"],
        "demo_wall_s": wall,
        "aggregator_cpu_ms_per_update": None
        if cpu_first is None or cpu_last is None
        else (cpu_last - cpu_first) / updates * 1000,
        "aggregator_peak_rss_mib": samples.aggregator_rss,
        "broker_peak_rss_mib": samples.broker_rss,
        "messages_per_round": len(counted) / (len(rows) - 1),
        "status_messages_per_round": sum(counted) / (len(rows) - 1),
        "participants_min": min(row["participants"] for row in rows),
        "rejected": sum(sum(row["rejected"].values()) for row in rows),
        "broker_dropped": sum(row["broker_dropped"] or 0 for row in rows),
        "monitor_cpu_s": monitor_cpu,
        "monitor_lines": monitor_lines,
    }


def show(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,1500")
    parser.add_argument("--per-process", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--monitor", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    logs.configure(json=True, level="warning")
    results = []
    with tempfile.TemporaryDirectory() as name:
        for nodes in (int(n) for n in args.sizes.split(",")):
            results.append(measure(nodes, args.per_process, args.rounds, args.monitor, Path(name)))
            print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    print(
        f"digits-mlp, up to {args.per_process} nodes per process, at least {args.rounds} rounds"
        " and 1,000 updates after round 1"
    )
    print(
        "    N  K  rounds data       round s  agg ms/upd  agg MiB  broker MiB  msgs/round  of them status"
        "  particip  rejected  dropped  monitor cpu s  lines"
    )
    for r in results:
        print(
            f"{r['nodes']:>5} {r['per_process']:>3} {r['rounds']:>6} {r['data']:<9} {r['median_round_s']:>8.3f}"
            f" {show(r['aggregator_cpu_ms_per_update'], '11.2f')} {show(r['aggregator_peak_rss_mib'], '8.1f')}"
            f" {show(r['broker_peak_rss_mib'], '11.1f')} {r['messages_per_round']:>11.0f}"
            f" {r['status_messages_per_round']:>15.0f} {r['participants_min']:>9}"
            f" {r['rejected']:>9} {r['broker_dropped']:>8} {show(r['monitor_cpu_s'], '14.2f')}"
            f" {show(r['monitor_lines'], '6d')}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
