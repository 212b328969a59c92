"""The aggregator's ingest rate through a real mosquitto against the raw paho -> mosquitto
-> paho rate for the same payloads, measured in the same run; and the aggregator's peak
RSS at that node count.

    .venv/bin/python bench/ingest_rate.py [--nodes 1000] [--repeats 3] [--aggregation fedavg]
        [--compare PYTHON] [--profile FILE]

One mosquitto from the project's mosquitto.conf; ``--nodes`` simulated nodes (paho
clients in one thread, paho's external-loop API: bench/broker_burst.py's ``Swarm``) each
publish one dense digits-mlp update of round 1 at QoS 1, all at once. Two consumers take
turns, ``--repeats`` times each, on the same payloads (same bytes, only the federation in
the topic differs):

- **raw**: a plain paho subscriber in its own process, subscribed at QoS 1 with a
  persistent session and manual acknowledgement like the aggregator, which acknowledges
  each message as it arrives (no decoding, no disk): from the first publish to its last
  message.
- **aggregator**: ``fedmq aggregator --state-dir`` (journal, fsync before the PUBACKs,
  checkpoint) expecting ``--nodes`` nodes: from the first publish to the close of round 1
  (``at`` of its metrics: every update accepted and combined). Its peak RSS is VmHWM
  (/proc), as last read before it exited.

The ratio is the aggregator's rate over the raw one, per pair of runs and of the
medians. CPU per update is each process's user + system time (/proc and ``os.wait4``)
over the burst divided by the updates: the consumer's from the first publish to its exit
(for the aggregator that includes the round's close, its checkpoint and its exit),
mosquitto's and the simulated nodes' from the first publish to the last message handled.
Also each consumer's CPU to its end of the burst (as last read, every 5 ms, before
the raw subscriber's last message, before the ``at`` of the aggregator's metrics: the
close of round 1; /proc counts in 10 ms ticks, so read it at 1,000 nodes or more), split
into its main thread (the raw subscriber's paho loop; the aggregator's decoding,
validation, fold and journal) and its other threads (the aggregator's paho thread).

``--compare PYTHON`` also runs ``PYTHON -m fedmq aggregator`` (another installation, say
of the code before a change) in every repeat, on the same payloads. ``--profile FILE``
runs the aggregator under cProfile once more (not timed) and prints where its main
thread spent the time.
"""

import argparse
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from broker_burst import Swarm, build_updates, fetch_global, node_id

from fedmq.broker.process import PROJECT_CONF, Mosquitto
from fedmq.schemas import GlobalModel, Topics

TIMEOUT = 120.0  # seconds any one run may take


@dataclass(frozen=True)
class Run:
    consumer: str
    nodes: int
    seconds: float  # first publish to the last message handled
    consumer_cpu: float  # seconds of CPU, from the first publish to its exit
    broker_cpu: float  # mosquitto's, from the first publish to the last message handled
    publisher_cpu: float  # the simulated nodes' (this process), publish to last PUBACK
    peak_rss_mib: float | None = None
    # from the first publish to the last message (raw) or the close of round 1: all, main
    to_close_cpu: float | None = None
    to_close_main_cpu: float | None = None

    def per_update_us(self, cpu: float) -> float:
        return cpu / self.nodes * 1e6

    @property
    def rate(self) -> float:
        return self.nodes / self.seconds


def raw_subscriber(host: str, port: int, topic: str, count: int) -> int:
    """``--raw-subscriber``: receive ``count`` messages on ``topic`` at QoS 1 (manual
    acknowledgement, each acked on arrival), then print the wall time of the last as JSON.
    Prints ``ready`` once subscribed."""
    received = 0
    last = 0.0
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"raw-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
        clean_session=False,  # as the aggregator with a state directory
        manual_ack=True,
    )

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            raise SystemExit(f"raw subscriber: connect refused: {reason}")
        c.subscribe(topic, 1)

    def on_subscribe(_c: mqtt.Client, _u: Any, _m: int, _codes: Any, _p: Any) -> None:
        print("ready", flush=True)

    def on_message(c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal received, last
        c.ack(message.mid, message.qos)
        received += 1
        if received == count:
            last = time.time()
            c.disconnect()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=60)
    client.loop_forever()
    print(json.dumps({"received": received, "last": last}), flush=True)
    return 0 if received == count else 1


def cpu_seconds(pid: int, *, task: int | None = None) -> float:
    """User + system CPU of a running process so far (/proc, clock ticks); of one of its
    threads with ``task``."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu(pid: int) -> float:
    """User + system CPU of a running process's main thread so far (its task ``pid``)."""
    return cpu_seconds(pid, task=pid)


def peak_rss(pid: int) -> float | None:
    """VmHWM of a running process (MiB), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def wait_usage(process: subprocess.Popen[Any], timeout: float) -> tuple[float, float]:
    """Wait for ``process`` to exit (at most ``timeout`` s): its CPU seconds (``os.wait4``)
    and its peak RSS in MiB, VmHWM as last read before it exited (read every 10 ms; not
    ``ru_maxrss``, which for a child that this process forked and exec'd counts this
    process's own RSS at the fork)."""
    deadline = time.monotonic() + timeout
    hwm = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                raise RuntimeError(f"{process.args[:4]} exited {process.returncode}")
            return usage.ru_utime + usage.ru_stime, hwm
        hwm = max(hwm, peak_rss(process.pid) or 0.0)
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"{process.args[:4]} still running after {timeout} s")
        time.sleep(0.01)


class Sampler:
    """(wall time, CPU, main thread's CPU) of a running process every 5 ms, from a thread
    of its own (the burst's publishing keeps this one's main thread busy)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                sample = (time.time(), cpu_seconds(self.pid), main_thread_cpu(self.pid))
            except (OSError, IndexError):  # exiting
                return
            self.samples.append(sample)

    def stop(self) -> list[tuple[float, float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


class Burst:
    """Every node publishes its payload at once; CPU counted from just before."""

    def __init__(self, broker: Mosquitto, swarm: Swarm, consumer: int, federation: str,
                 payloads: list[bytes]) -> None:  # fmt: skip
        assert broker.pid is not None
        self.broker_pid = broker.pid
        topics = Topics(federation)
        messages = [(topics.update(node_id(i)), p) for i, p in enumerate(payloads)]
        self.nodes = len(payloads)
        self.consumer_cpu = cpu_seconds(consumer)
        self.consumer_main_cpu = main_thread_cpu(consumer)
        self.broker_cpu = cpu_seconds(broker.pid)
        own = time.process_time()
        self.started = time.time()
        swarm.publish_all(messages, timeout=TIMEOUT)
        self.publisher_cpu = time.process_time() - own

    def run(self, consumer: str, last: float, cpu: float, rss: float | None = None,
            samples: Sequence[tuple[float, float, float]] = ()) -> Run:  # fmt: skip
        """``last``: wall time of the last message handled; ``cpu``: the consumer's at exit;
        ``samples``: its (wall time, CPU, main thread's CPU) while it ran."""
        broker = cpu_seconds(self.broker_pid) - self.broker_cpu
        before = [(total, main) for at, total, main in samples if at <= last]
        total, main = before[-1] if before else (None, None)
        return Run(consumer, self.nodes, last - self.started, cpu - self.consumer_cpu, broker,
                   self.publisher_cpu, rss,
                   None if total is None else total - self.consumer_cpu,
                   None if main is None else main - self.consumer_main_cpu)  # fmt: skip


def run_raw(broker: Mosquitto, swarm: Swarm, federation: str, payloads: list[bytes]) -> Run:
    topics = Topics(federation)
    command = [sys.executable, __file__, "--raw-subscriber", broker.host, str(broker.port),
               topics.all_updates, str(len(payloads))]  # fmt: skip
    subscriber = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert subscriber.stdout is not None
        if subscriber.stdout.readline().strip() != "ready":
            raise RuntimeError("raw subscriber did not subscribe")
        sampler = Sampler(subscriber.pid)
        burst = Burst(broker, swarm, subscriber.pid, federation, payloads)
        out = subscriber.stdout.read()
        samples = sampler.stop()
        cpu, _ = wait_usage(subscriber, TIMEOUT)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait()
    result = json.loads(out.strip().splitlines()[-1])
    if result["received"] != len(payloads):
        raise RuntimeError(f"raw subscriber got {result['received']} of {len(payloads)}")
    return burst.run("raw", result["last"], cpu, samples=samples)


def aggregator_command(broker: Mosquitto, federation: str, nodes: int, workdir: Path,
                       aggregation: str) -> list[str]:  # fmt: skip
    return [
        "-m", "fedmq", "aggregator", "--broker", broker.address, "--federation", federation,
        "--nodes", str(nodes), "--rounds", "1", "--test-data", "none", "--aggregation",
        aggregation, "--state-dir", str(workdir / "state"), "--report",
        str(workdir / "report.json"), "--log-json", "--log-level", "warning",
    ]  # fmt: skip


def run_aggregator(broker: Mosquitto, swarm: Swarm, federation: str, payloads: list[bytes],
                   workdir: Path, aggregation: str, *, python: str = sys.executable,
                   label: str = "aggregator", profile: Path | None = None) -> Run:  # fmt: skip
    workdir.mkdir(parents=True)
    command = aggregator_command(broker, federation, len(payloads), workdir, aggregation)
    if profile is not None:
        command = ["-m", "cProfile", "-o", str(profile), *command]
    log = (workdir / "aggregator.log").open("wb")
    process = subprocess.Popen([python, *command], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=workdir)  # fmt: skip
    try:
        fetch_global(swarm, federation)
        sampler = Sampler(process.pid)
        burst = Burst(broker, swarm, process.pid, federation, payloads)
        cpu, rss = wait_usage(process, TIMEOUT)
        samples = sampler.stop()
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        log.close()
    report = json.loads((workdir / "report.json").read_text())
    [first] = report["rounds"]
    if first["participants"] != len(payloads) or first["rejected"]:
        raise RuntimeError(f"round 1: {first['participants']} participants, {first['rejected']}")
    return burst.run(label, first["at"], cpu, rss, samples)


def initial_model(broker: Mosquitto, swarm: Swarm, workdir: Path, aggregation: str) -> GlobalModel:
    """The aggregator's initial global model (the same for every federation: same task,
    same seed), from a short-lived aggregator, read in ``swarm``'s loop."""
    federation = f"ingest-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    command = aggregator_command(broker, federation, 1, workdir, aggregation)
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=workdir)  # fmt: skip
    try:
        return fetch_global(swarm, federation)
    finally:
        process.terminate()
        process.wait()


def payloads_for(model: GlobalModel, nodes: int) -> tuple[str, list[bytes]]:
    """A new federation id and every node's dense update of round 1 in it: the same
    deltas (seed 0) whatever the federation, whose name has the same length."""
    federation = f"ingest-{uuid.uuid4().hex[:8]}"
    updates = build_updates(replace(model, federation=federation), nodes)
    return federation, [payload for _, payload in updates]


def median_interval(values: Sequence[float], *, draws: int = 4000) -> tuple[float, float]:
    """A 95 % interval of the median of ``values`` (bootstrap, percentile method; fixed
    seed): one repeat's ratio swings by tens of points on this machine, so a median says
    little without it."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def spread(ratios: Sequence[float]) -> str:
    """The per-repeat ratios' median interval and how many reach the target (80 %)."""
    low, high = median_interval(ratios)
    reach = sum(ratio >= 0.8 for ratio in ratios)
    return (f"per-repeat ratio: median 95 % interval {low:.0%}-{high:.0%} (bootstrap), "
            f"{reach} of {len(ratios)} repeats at 80 % or more")  # fmt: skip


def to_close(run: Run) -> str:
    """A consumer's CPU per update to its end of the burst: all, main thread, others."""
    if run.to_close_cpu is None or run.to_close_main_cpu is None:
        return ""
    total, main = run.per_update_us(run.to_close_cpu), run.per_update_us(run.to_close_main_cpu)
    return f" {total:>12.0f} {main:>5.0f} {total - main:>6.0f}"


def show_profile(path: Path, lines: int = 25) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per consumer (default 3)")
    parser.add_argument("--aggregation", default="fedavg", help="the aggregator's rule")
    parser.add_argument("--compare", metavar="PYTHON",
                        help="also run PYTHON -m fedmq aggregator (another installation)")  # fmt: skip
    parser.add_argument("--profile", type=Path, help="also profile one aggregator run here")
    parser.add_argument("--raw-subscriber", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_subscriber:
        host, port, topic, count = args.raw_subscriber
        return raw_subscriber(host, int(port), topic, int(count))
    aggregators = [("aggregator", sys.executable)]
    if args.compare:
        aggregators.append(("compared", args.compare))
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="fedmq-ingest-") as tmp,
        Mosquitto(config=PROJECT_CONF) as broker,
    ):
        base = Path(tmp)
        swarm = Swarm(broker.host, broker.port, [f"swarm-{node_id(i)}" for i in range(args.nodes)])
        try:
            swarm.connect()
            model = initial_model(broker, swarm, base / "initial", args.aggregation)
            size = len(payloads_for(model, 1)[1][0])
            print(f"{args.nodes} nodes, dense digits-mlp updates ({size:,} B) at QoS 1, all at "
                  f"once; aggregator --aggregation {args.aggregation}"
                  + (f"; compared: {args.compare}" if args.compare else ""))  # fmt: skip
            print(f"{'run':>3} {'consumer':<11} {'seconds':>8} {'updates/s':>10} "
                  f"{'CPU us/update: consumer':>24} {'broker':>7} {'nodes':>6} {'peak RSS MiB':>13}"
                  f" {'to end: all':>12} {'main':>5} {'other':>6}")  # fmt: skip
            for repeat in range(args.repeats):
                # raw first, then the aggregator on the same bytes; a second aggregator
                # needs a federation of its own (the first left its final model retained):
                # the same deltas, a federation id of the same length
                federation, payloads = payloads_for(model, args.nodes)
                done = [run_raw(broker, swarm, federation, payloads)]
                for label, python in aggregators:
                    done.append(run_aggregator(broker, swarm, federation, payloads,
                                               base / f"{label}-{repeat}", args.aggregation,
                                               python=python, label=label))  # fmt: skip
                    federation, payloads = payloads_for(model, args.nodes)
                for run in done:
                    rss = "" if run.peak_rss_mib is None else f"{run.peak_rss_mib:.1f}"
                    print(f"{repeat + 1:>3} {run.consumer:<11} {run.seconds:>8.3f} "
                          f"{run.rate:>10,.0f} {run.per_update_us(run.consumer_cpu):>24.0f} "
                          f"{run.per_update_us(run.broker_cpu):>7.0f} "
                          f"{run.per_update_us(run.publisher_cpu):>6.0f} {rss:>13}"
                          f"{to_close(run)}", flush=True)  # fmt: skip
                for run in done[1:]:
                    print(f"{'':>3} {'ratio ' + run.consumer:<20} {run.rate / done[0].rate:>10.0%}")
                runs += done
            if args.profile is not None:
                args.profile.parent.mkdir(parents=True, exist_ok=True)
                federation, payloads = payloads_for(model, args.nodes)
                run_aggregator(broker, swarm, federation, payloads, base / "profiled",
                               args.aggregation, profile=args.profile)  # fmt: skip
        finally:
            swarm.close()
    raw = [r for r in runs if r.consumer == "raw"]
    raw_rate = statistics.median(r.rate for r in raw)
    raw_cpu = statistics.median(r.per_update_us(r.consumer_cpu) for r in raw)
    ended = [r.per_update_us(r.to_close_cpu) for r in raw if r.to_close_cpu is not None]
    to_end = f", {statistics.median(ended):.0f} to its last message" if ended else ""
    print(f"median of {len(raw)}: raw {raw_rate:,.0f}/s, CPU {raw_cpu:.0f} us/update{to_end}")
    for label, _ in aggregators:
        own = [r for r in runs if r.consumer == label]
        rate = statistics.median(r.rate for r in own)
        ratios = statistics.median(r.rate / w.rate for r, w in zip(own, raw, strict=True))
        cpu = statistics.median(r.per_update_us(r.consumer_cpu) for r in own)
        rss = max(r.peak_rss_mib or 0.0 for r in own)
        closed = [r for r in own if r.to_close_cpu is not None and r.to_close_main_cpu is not None]
        split = ""
        if closed:
            total = statistics.median(r.per_update_us(r.to_close_cpu or 0.0) for r in closed)
            main = statistics.median(r.per_update_us(r.to_close_main_cpu or 0.0) for r in closed)
            split = f"; to the round's close {total:.0f} us/update, main thread {main:.0f}"
        print(f"  {label}: {rate:,.0f}/s = {rate / raw_rate:.0%} of raw (median of the "
              f"per-repeat ratios {ratios:.0%}), CPU {cpu:.0f} us/update (first publish to "
              f"its exit){split}, peak RSS {rss:.1f} MiB")  # fmt: skip
        print(f"    {spread([r.rate / w.rate for r, w in zip(own, raw, strict=True)])}")
    if args.compare:  # the two aggregators of each repeat against each other
        first = [r for r in runs if r.consumer == "aggregator"]
        second = [r for r in runs if r.consumer == "compared"]
        paired = [c.rate / a.rate for a, c in zip(first, second, strict=True)]
        low, high = median_interval(paired)
        print(f"  compared / aggregator, per repeat: median {statistics.median(paired):.3f} "
              f"(95 % interval {low:.3f}-{high:.3f}), compared faster in "
              f"{sum(p > 1 for p in paired)} of {len(paired)}")  # fmt: skip
    if args.profile is not None:
        show_profile(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
