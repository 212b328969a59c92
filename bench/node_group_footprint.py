"""A ``fedmq node-group`` process's footprint with N nodes online: threads, resident
memory, open files, and how long until every node is online.

    .venv/bin/python bench/node_group_footprint.py [--nodes 250] [--runs 1]

Each run starts mosquitto (loopback, free port) and one ``fedmq node-group`` of N nodes
(``--demo-shard i/N``, no aggregator: the nodes wait for a model), waits until every
node's retained status is ``online`` (or 120 s), then reads /proc/<pid>/status (Threads,
VmRSS) and /proc/<pid>/fd of the group's process and stops it (SIGTERM). It measures the
fedmq installed in this interpreter's environment: run it on two installs to compare.
"""

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from fedmq.broker.process import Mosquitto
from fedmq.schemas import Topics, decode_status


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def run(nodes: int, workdir: Path) -> dict[str, float]:
    federation = f"footprint-{uuid.uuid4().hex[:8]}"
    topics = Topics(federation)
    states: dict[str, str] = {}
    with Mosquitto() as broker:
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"w-{federation}")

        def on_message(_c, _u, message):  # type: ignore[no-untyped-def]
            states[message.topic] = decode_status(message.payload).state

        watcher.on_message = on_message
        watcher.connect(broker.host, broker.port)
        watcher.subscribe(topics.all_status, qos=1)
        watcher.loop_start()
        group_file = workdir / "nodes.txt"
        group_file.write_text(
            "".join(
                f"--node-id n{i:04d} --demo-shard {i + 1}/{nodes} --broker {broker.address} "
                f"--federation {federation} --state-dir {workdir / f'n{i:04d}'}\n"
                for i in range(nodes)
            )
        )
        started = time.monotonic()
        log = (workdir / "group.log").open("wb")
        group = subprocess.Popen(
            [sys.executable, "-m", "fedmq", "node-group", str(group_file), "--log-json"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            online = 0
            while time.monotonic() - started < 120 and group.poll() is None:
                online = sum(state == "online" for state in list(states.values()))
                if online == nodes:
                    break
                time.sleep(0.2)
            took = time.monotonic() - started
            time.sleep(2)  # settled: every client connected and idle
            status = _status(group.pid)
            files = len(list(Path(f"/proc/{group.pid}/fd").iterdir()))
            group.send_signal(signal.SIGTERM)
            group.wait(timeout=60)
        finally:
            if group.poll() is None:
                group.kill()
                group.wait()
            log.close()
            watcher.disconnect()
            watcher.loop_stop()
    return {
        "online": online,
        "seconds_to_online": round(took, 1),
        "threads": int(status["Threads"]),
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "open_files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=250)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as workdir:
            print(run(args.nodes, Path(workdir)), flush=True)


if __name__ == "__main__":
    main()
