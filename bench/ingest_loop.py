"""The aggregator's CPU per update through its own intake, in one process: no broker, no
simulated nodes beside it to share the cores with, so a quieter figure than
``ingest_rate.py``'s on a busy machine.

    .venv/bin/python bench/ingest_loop.py [NODES] [--profile]

NODES (default 1,000) dense digits-mlp updates of round 1 (``broker_burst.build_updates``),
written as QoS 1 PUBLISH packets into one end of a socket pair whose other end is the
aggregator client's socket, go through what ``aggregator/app.py`` runs: ``edge.Loop``
(reading), ``Aggregator.handle`` (decoding, validation, journal, fold, the round's
close), one fsync per batch and ``edge.acknowledge_all``; a thread writes the packets and
reads the PUBACKs. Printed: the main thread's CPU (``time.thread_time``) per update, five
runs and their median; ``--profile``: one run under cProfile (CPU time), by cumulative time.
Run it with another installation's Python (from that checkout) to compare.
"""

import cProfile
import pstats
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from broker_burst import build_updates

from fedmq import logs
from fedmq import mqtt as edge
from fedmq.aggregator.app import build_aggregator, resume_or_start
from fedmq.aggregator.checkpoint import StateDir
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.schemas import Topics, decode_global


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + struct.pack("!H", mid) + payload
    return bytes([0x32]) + varint(len(body)) + body


def once(n: int, profile: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="fedmq-ingest-loop-") as tmp:
        return _once(n, profile, Path(tmp))


def _once(n: int, profile: bool, tmp: Path) -> float:
    logs.configure(json=True, level="warning")
    fed = "bench"
    published: dict[str, bytes] = {}
    config = AggregatorSettings(test_data=None, eval_fraction=0.0, nodes=n, rounds=1,
                                federation=fed, aggregation="fedavg")  # fmt: skip
    store = StateDir(tmp)
    agg = build_aggregator(config, lambda t, p, r: published.__setitem__(t, p), store)
    assert not resume_or_start(agg, store)
    agg.start()
    topics = Topics(fed)
    glob = decode_global(published[topics.global_model])
    updates = build_updates(glob, n)
    stream = b"".join(publish_packet(t, p, i % 65535 + 1) for i, (t, p) in enumerate(updates))
    inbox = edge.Batch()
    client = edge.make_client(
        edge.make_client_id(fed, "aggregator"), inbox=inbox, manual_ack=True, persistent=True
    )
    a, b = socket.socketpair()
    a.setblocking(False)
    client._sock = a  # paho's private socket: as if connected to a broker
    loop = edge.Loop(client, inbox)
    acks = bytearray()

    def writer() -> None:
        b.sendall(stream)

    def reader() -> None:
        while len(acks) < 4 * n:
            data = b.recv(65536)
            if not data:
                return
            acks.extend(data)

    tw = threading.Thread(target=writer)
    tr = threading.Thread(target=reader)
    prof = cProfile.Profile(time.thread_time) if profile else None
    updates_prefix = topics.prefix + "/updates/"
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    tw.start()
    tr.start()
    if prof:
        prof.enable()
    while not agg.done:
        if not inbox:
            loop.run(0.5, limit=4096)
        batch = loop.take()
        if not batch:
            agg.tick()
            continue
        for received in batch:
            if received.topic.startswith(updates_prefix):
                agg.handle(received.topic, received.payload)
        store.sync()
        edge.acknowledge_all(client, batch)
        if client.want_write():
            client.loop_write()
    while client.want_write():
        client.loop_write()
    if prof:
        prof.disable()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    tw.join()
    tr.join(5)
    assert len(acks) == 4 * n, len(acks)
    assert len(agg.history[0].participants) == n
    store.close()
    a.close()
    b.close()
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(60)
    print(f"{n} updates: main-thread CPU {cpu / n * 1e6:.0f} us/update, wall {wall / n * 1e6:.0f}"
          " us/update", flush=True)  # fmt: skip
    return cpu / n * 1e6


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    profile = "--profile" in sys.argv
    reps = 1 if profile else 5
    results = sorted(once(n, profile) for _ in range(reps))
    print("median", results[len(results) // 2], "all", [round(r) for r in results])
