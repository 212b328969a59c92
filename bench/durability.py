"""What crash safety costs and how fast an aggregator is back.

    .venv/bin/python bench/durability.py

1. Accepting one dense digits-mlp update through ``Aggregator.handle``: in memory (no
   state dir), journaled with one fsync per update (a lone update per batch, the worst
   case), and journaled with one fsync per batch of 10 (group commit, as the MQTT edge
   does when updates arrive together). Same payloads, same run.
2. Resuming in-process: load the checkpoint and replay a journal of N accepted updates.
3. A real restart: ``fedmq aggregator`` SIGKILLed mid-round against a real mosquitto
   and started again on the same state dir; time from the new process's start until it
   has republished the open round's global model.
"""

import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from fedmq import logs
from fedmq.aggregator.app import resume_or_start
from fedmq.aggregator.checkpoint import StateDir
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
from fedmq.broker.process import Mosquitto
from fedmq.models import get_model
from fedmq.schemas import NodeUpdate, Topics, TrainingPlan, encode, model_id_of

MODEL = get_model("digits-mlp")
UPDATES = 200
REPEATS = 5


def settings(expected: int) -> RoundSettings:
    return RoundSettings(
        federation="bench", model_name="digits-mlp", model=MODEL, rounds=10**6,
        policy=RoundPolicy(expected_nodes=expected, min_nodes=1),
        plan=TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0),
        max_update_bytes=dense_update_bound(MODEL),
    )  # fmt: skip


def payloads(params: dict[str, np.ndarray], count: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        delta = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in params.items()}
        update = NodeUpdate(federation="bench", node_id=f"n{i:05d}", round=1,
                            base_model_id=model_id_of(params), num_examples=150,
                            train_loss=1.0, train_seconds=0.0, delta=delta)  # fmt: skip
        out.append((f"fedmq/bench/updates/n{i:05d}", encode(update)))
    return out


def time_accept(batch: int | None, messages: list[tuple[str, bytes]]) -> float:
    """Seconds per accepted update; ``batch`` None = no state dir, else fsync every N."""
    params = MODEL.init(0)
    runs = []
    for _ in range(REPEATS):
        directory = Path(tempfile.mkdtemp(prefix="fedmq-bench-"))
        store = StateDir(directory) if batch is not None else None
        aggregator = Aggregator(settings(10**6), params, publish=lambda *_: None, store=store)
        aggregator.start()
        started = time.perf_counter()
        for index, (topic, payload) in enumerate(messages, 1):
            aggregator.handle(topic, payload)
            if store is not None and index % (batch or 1) == 0:
                store.sync()
        if store is not None:
            store.sync()
        runs.append((time.perf_counter() - started) / len(messages))
        assert aggregator.reported == len(messages)
        if store is not None:
            store.close()
        shutil.rmtree(directory)
    return statistics.median(runs)


def time_resume(messages: list[tuple[str, bytes]]) -> float:
    params = MODEL.init(0)
    directory = Path(tempfile.mkdtemp(prefix="fedmq-bench-"))
    store = StateDir(directory)
    first = Aggregator(settings(10**6), params, publish=lambda *_: None, store=store)
    first.start()
    for topic, payload in messages:
        first.handle(topic, payload)
    store.close()
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        again_store = StateDir(directory)
        again = Aggregator(settings(10**6), params, publish=lambda *_: None, store=again_store)
        assert resume_or_start(again, again_store)
        runs.append(time.perf_counter() - started)
        assert again.reported == len(messages)
        again_store.close()
    shutil.rmtree(directory)
    return statistics.median(runs)


def time_process_restart(repeats: int = 3) -> list[float]:
    """Start to republished global of a restarted ``fedmq aggregator`` process."""
    workdir = Path(tempfile.mkdtemp(prefix="fedmq-bench-"))
    topics = Topics("bench-restart")
    results = []
    with Mosquitto() as broker:
        seen = threading.Event()
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        watcher.on_message = lambda *_: seen.set()
        watcher.connect(broker.host, broker.port)
        watcher.loop_start()
        args = [sys.executable, "-m", "fedmq", "aggregator", "--broker", broker.address,
                "--federation", "bench-restart", "--nodes", "3", "--rounds", "5",
                "--state-dir", str(workdir / "state"), "--log-json", "--test-data", "none"]  # fmt: skip
        log = (workdir / "aggregator.log").open("ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(0.5)
            watcher.subscribe(topics.global_model, qos=1)
            if not seen.wait(60):
                raise RuntimeError("the aggregator never published round 1")
            for _ in range(repeats):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                watcher.unsubscribe(topics.global_model)
                time.sleep(0.3)
                watcher.subscribe(topics.global_model, qos=1)  # the retained copy
                time.sleep(0.3)
                seen.clear()
                started = time.monotonic()
                proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
                if not seen.wait(60):
                    raise RuntimeError("the restarted aggregator did not republish")
                results.append(time.monotonic() - started)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            watcher.loop_stop()
            watcher.disconnect()
            log.close()
    shutil.rmtree(workdir)
    return results


def main() -> None:
    logs.configure(json=True, level="error")
    messages = payloads(MODEL.init(0), UPDATES)
    size = len(messages[0][1])
    memory = time_accept(None, messages)
    each = time_accept(1, messages)
    grouped = time_accept(10, messages)
    print(f"accept one dense digits-mlp update ({size} B), median of {REPEATS} x {UPDATES}:")
    print(f"  in memory (no state dir)      {memory * 1e6:8.1f} us   1.00x")
    print(f"  journal, fsync every update   {each * 1e6:8.1f} us  {each / memory:5.2f}x")
    print(f"  journal, fsync per 10 (group) {grouped * 1e6:8.1f} us  {grouped / memory:5.2f}x")
    print(f"resume in-process, journal of {UPDATES} updates: {time_resume(messages) * 1e3:.1f} ms")
    restarts = time_process_restart()
    print(
        "SIGKILLed fedmq aggregator restarted: start to republished global, s: "
        + ", ".join(f"{r:.2f}" for r in restarts)
    )


if __name__ == "__main__":
    main()
