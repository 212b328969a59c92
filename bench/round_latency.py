"""Round wall time of the reference task, split into local training, waiting and
aggregation, plus bytes on the wire. Runs a real federation (``fedmq demo``).

    .venv/bin/python bench/round_latency.py [--nodes 10] [--rounds 30] [--model digits-mlp]

Wall time of round r is the time between the metrics of rounds r-1 and r (both stamped by
the aggregator), so it covers publish, delivery, training, upload and aggregation. Local
training is the median of the nodes' reported training time, aggregation the aggregator's
averaging + evaluation + encoding, waiting the rest (messaging, decoding, scheduling).
Round 1 includes process start-up and JIT compile, so medians are over rounds 2.. only.
"""

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from fedmq import logs
from fedmq.demo import DemoSettings, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", default="digits-mlp")
    args = parser.parse_args()
    logs.configure(json=True, level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        config = DemoSettings(
            nodes=args.nodes, rounds=args.rounds, model=args.model, report=report_path
        )
        with open("/dev/null", "w") as quiet:
            if run(config, threading.Event(), out=quiet) != 0:
                print("the federation failed", file=sys.stderr)
                return 1
        import json

        rows = json.loads(report_path.read_text())["rounds"]
    print(f"{args.nodes} nodes, {args.model}, {args.rounds} rounds")
    print("round   wall ms  train ms  wait ms   agg ms   uplink B  downlink B  accuracy")
    walls, trains, waits, aggs = [], [], [], []
    for previous, row in itertools.pairwise(rows):
        wall = row["at"] - previous["at"]
        train = row["train_seconds_median"]
        agg = row["aggregate_seconds"]
        wait = wall - train - agg
        walls.append(wall), trains.append(train), waits.append(wait), aggs.append(agg)
        print(
            f"{row['round']:>5} {wall * 1e3:9.2f} {train * 1e3:9.2f} {wait * 1e3:8.2f} {agg * 1e3:8.2f}"
            f" {row['uplink_bytes']:>10} {row['downlink_bytes']:>11}  {row['accuracy']:.4f}"
        )
    med = statistics.median
    print(
        f"median (rounds 2-{len(rows)}): wall {med(walls) * 1e3:.2f} ms = train {med(trains) * 1e3:.2f}"
        f" + wait {med(waits) * 1e3:.2f} + aggregate {med(aggs) * 1e3:.2f} ms;"
        f" per update {rows[-1]['uplink_bytes'] // rows[-1]['participants']} B up,"
        f" global model {rows[-1]['global_bytes']} B down"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
