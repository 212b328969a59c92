"""A node's footprint in a real federation: peak resident memory, start-up time and CPU
time per round.

    .venv/bin/python bench/node_footprint.py [--nodes 3] [--rounds 30] [--runs 2]

Each run starts mosquitto (loopback, free port), an aggregator (``--test-data none``) and
then the nodes one at a time, as a device would run them: ``python -m fedmq node
--config node.toml`` with its own .npz shard of the digits training split (so no
scikit-learn in the node) and its own state directory. Each node starts only after the
previous one has published its first update, so start-ups do not compete with each other
(the running nodes, aggregator and broker still share the machine).

Measured from outside, on the node's process:

- start-up: from just before the process is spawned to its ``training`` status for
  round 1 (global model received and handled: Python, JAX and the data loaded) and to
  its first update on the wire (the JIT compile and the first local epoch on top);
  "cold": an empty state directory; "warm": the same state directory again with the
  JAX compilation cache the cold run left (what a restarted node has; its saved update
  is removed so that it trains). The cache only hits at the same path: a copy of it in
  another directory compiled again in a trial run.
- CPU per round: user + system time from /proc/<pid>/stat when its round-2 update
  arrives and when its last update arrives, divided by the rounds in between (steady
  state: start-up and the compile are left out; idle time between rounds is included).
- peak RSS: VmHWM from /proc/<pid>/status at its last update; VmRSS then too.

The machine is shared and loaded: figures are medians over every node of every run.
"""

import argparse
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from fedmq.broker.process import Mosquitto
from fedmq.datasets import digits, partition
from fedmq.schemas import Topics
from fedmq.schemas.messages import decode_status, decode_update

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def memory_mib(pid: int) -> dict[str, float]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            found[name] = int(value.split()[0]) / 1024
    return found


@dataclass
class Measured:
    name: str
    pid: int = 0
    spawned: float = 0.0
    handled: float | None = None  # first `training` status
    first_update: float | None = None
    cpu: dict[int, float] = field(default_factory=dict)  # round -> CPU s at its update
    memory: dict[str, float] = field(default_factory=dict)


def python_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def spawn(args: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedmq", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
            env=python_env(),
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def one_run(
    work: Path, *, nodes: int, rounds: int, warm_from: Path | None
) -> tuple[list[Measured], Path]:
    federation = f"fp-{uuid.uuid4().hex[:8]}"
    topics = Topics(federation)
    train, _ = digits()
    shards = partition(train.y, nodes, "iid", 0)
    events: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
    processes: list[subprocess.Popen[bytes]] = []
    with Mosquitto() as broker:
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{federation}-bench")
        watcher.on_message = lambda _c, _u, m: events.put((time.monotonic(), m.topic, m.payload))
        watcher.connect(broker.host, broker.port)
        watcher.subscribe(
            [(topics.all_updates, 1), (topics.all_status, 1), (topics.global_model, 0)]
        )
        watcher.loop_start()
        measured: dict[str, Measured] = {}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            processes.append(
                spawn(
                    ["aggregator", "--broker", broker.address, "--federation", federation,
                     "--nodes", str(nodes), "--rounds", str(rounds), "--test-data", "none",
                     "--state-dir", str(work / "aggregator")],
                    work / "aggregator.log",
                    work,
                )
            )  # fmt: skip
            wait_for(events, lambda topic, _p: topic == topics.global_model, 120, measured, procs)
            for index in range(nodes):
                name = f"pi-{index + 1:02d}"
                # warm: the same node directory again, as a restarted device has it, with
                # only JAX's compilation cache kept (the cache key depends on its path)
                home = (warm_from or work) / name
                state = home / "state"
                if warm_from is None:
                    home.mkdir()
                else:
                    for kept in state.iterdir():
                        if kept.name != "jax-cache":
                            shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
                np.savez(home / "data.npz", x=train.x[shards[index]], y=train.y[shards[index]])
                (home / "node.toml").write_text(
                    f'[connection]\nbroker = "{broker.address}"\nfederation = "{federation}"\n\n'
                    f'[node]\nnode_id = "{name}"\ndata = "data.npz"\nstate_dir = "state"\n'
                )
                measured[name] = record = Measured(name)
                record.spawned = time.monotonic()
                procs[name] = spawn(
                    ["node", "--config", str(home / "node.toml")], home / "node.log", home
                )
                record.pid = procs[name].pid
                processes.append(procs[name])
                wait_for(
                    events,
                    lambda _t, _p, r=record: r.first_update is not None,
                    180,
                    measured,
                    procs,
                )
            wait_for(
                events,
                lambda _t, _p: all(rounds in m.cpu for m in measured.values()),
                60 + 10 * rounds,
                measured,
                procs,
            )
        finally:
            watcher.loop_stop()
            watcher.disconnect()
            for process in reversed(processes):
                stop(process)
    return list(measured.values()), work


def wait_for(events, done, timeout, measured, procs) -> None:
    """Handle watcher events until ``done(topic, payload)`` holds after one of them."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError("timed out; see the logs in the work directory")
        try:
            at, topic, payload = events.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            for name, process in procs.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}") from None
            continue
        parts = topic.split("/")
        record = measured.get(parts[-1]) if len(parts) == 4 else None
        if record is not None and parts[2] == "status" and payload:
            status = decode_status(payload)
            if status.state == "training" and record.handled is None:
                record.handled = at
        elif record is not None and parts[2] == "updates":
            update = decode_update(payload)
            if record.first_update is None:
                record.first_update = at
            record.cpu[update.round] = cpu_seconds(record.pid)
            record.memory = memory_mib(record.pid)
        if done(topic, payload):
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=2, help="cold + warm pairs")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs here")
    args = parser.parse_args()
    rows: dict[str, list[Measured]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="fedmq-footprint-") as tmp:
        root = args.keep or Path(tmp)
        for run in range(args.runs):
            cold = root / f"run{run}-cold"
            cold.mkdir(parents=True)
            measured, _ = one_run(cold, nodes=args.nodes, rounds=args.rounds, warm_from=None)
            rows["cold"] += measured
            warm = root / f"run{run}-warm"
            warm.mkdir(parents=True)
            measured, _ = one_run(warm, nodes=args.nodes, rounds=args.rounds, warm_from=cold)
            rows["warm"] += measured
    med = statistics.median
    load = os.getloadavg()
    print(
        f"fedmq node footprint: digits-mlp, {args.nodes} nodes x {args.runs} runs per row, "
        f"{args.rounds} rounds, loopback; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        f"{'':<6} {'samples':>7} {'handled s':>10} {'1st update s':>13} "
        f"{'CPU ms/round':>13} {'peak RSS MiB':>13} {'RSS MiB':>8}"
    )
    for name, runs in rows.items():
        per_round = [
            (m.cpu[args.rounds] - m.cpu[2]) / (args.rounds - 2) * 1e3 for m in runs if 2 in m.cpu
        ]
        print(
            f"{name:<6} {len(runs):>7} {med(m.handled - m.spawned for m in runs if m.handled):>10.2f}"
            f" {med(m.first_update - m.spawned for m in runs if m.first_update):>13.2f}"
            f" {med(per_round):>13.2f} {med(m.memory['VmHWM'] for m in runs):>13.0f}"
            f" {med(m.memory['VmRSS'] for m in runs):>8.0f}"
        )
        print(
            "       ranges: handled "
            f"{min(m.handled - m.spawned for m in runs if m.handled):.2f}-"
            f"{max(m.handled - m.spawned for m in runs if m.handled):.2f} s, CPU "
            f"{min(per_round):.2f}-{max(per_round):.2f} ms, peak RSS "
            f"{min(m.memory['VmHWM'] for m in runs):.0f}-{max(m.memory['VmHWM'] for m in runs):.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
