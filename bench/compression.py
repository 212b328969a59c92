"""Uplink compression: bytes per update as published, accuracy, and codec cost.

    .venv/bin/python bench/compression.py [--models digits-mlp,digits-mlp-large]
        [--partitions iid,dirichlet:0.5] [--pipelines dense,fp16,...] [--rounds 30]

Each (model, partition, pipeline) is a real federation (``fedmq demo``: mosquitto, an
aggregator and 10 node processes), so bytes are the payloads the nodes published,
headers included, as the aggregator counted them. Ratios are against dense float32 of the
same model and partition, measured in the same run of this script. Encode (compress +
msgpack) and decode (decode + validate + accumulate into the running sum) are timed
in-process on a delta from one real local epoch, as CPU time, the pipelines taking turns
(see ``codec_costs``). ``--codecs-only`` prints just those costs.

    .venv/bin/python bench/compression.py --models digits-mlp-large --partitions iid \
        --both-ways dense/none,topk:0.035+sign+ef+flat/none,topk:0.035+sign+ef+flat/topk:0.035+sign+ef+flat

``--both-ways UP/DOWN,...`` runs one federation per pair instead: the nodes' SPEC up and
the aggregator's --downlink-compression down (issue 16), and prints bytes both ways:
uplink as the aggregator counted it, downlink as the nodes counted what was delivered to
them (metrics ``downlink_delivered``) and as the old estimate (``downlink_bytes``), their
total against the first pair's, and the sizes of one full and one compact model.
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np

from fedmq import logs
from fedmq.aggregator.fedavg import WeightedSum
from fedmq.compression import parse_spec
from fedmq.compression.transforms import error_feedback_init
from fedmq.datasets import digits, partition
from fedmq.demo import DemoSettings, run
from fedmq.models import get_model
from fedmq.schemas import NodeUpdate, decode_update, encode

PIPELINES = [
    "dense", "fp16", "int8", "int4", "topk:0.1+ef", "topk:0.1+ef+flat", "topk:0.01+ef",
    "topk:0.01+ef+flat", "topk:0.01+int8+ef", "topk:0.01+int8+ef+flat", "topk:0.02+int4+ef+flat",
    "topk:0.035+sign+ef", "topk:0.035+sign+ef+zlib", "topk:0.035+sign+ef+flat",
    "topk:0.035+sign+ef+flat+zlib",
]  # fmt: skip


def federation(
    model: str, part: str, spec: str, rounds: int, seed: int, downlink: str = "none"
) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        config = DemoSettings(nodes=10, rounds=rounds, model=model, partition=part, seed=seed,
                            compression=spec, downlink_compression=downlink,
                            report=report)  # fmt: skip
        with open("/dev/null", "w") as quiet:
            if run(config, threading.Event(), out=quiet) != 0:
                raise RuntimeError(f"federation {model} {part} {spec} failed")
        return json.loads(report.read_text())["rounds"]


def codec_costs(
    model_name: str, specs: list[str], rounds: int = 30
) -> dict[str, tuple[float, float, int]]:
    """Per SPEC: (encode s, decode+accumulate s, payload bytes) of one update of a real
    delta. Costs are CPU time of this thread (other work on a shared machine does not
    count), the minimum over rounds of 10 calls, the SPECs taking turns in every round so
    that dense and compressed are measured under the same conditions."""
    from fedmq.tasks.training import delta

    try:
        from bench.trainer import Trainer
    except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
        from trainer import Trainer  # type: ignore[no-redef]

    train, _ = digits()
    shard = partition(train.y, 10, "iid", 0)[0]
    model = get_model(model_name)
    params = model.init(0)
    trained, _ = Trainer(model_name, train.x[shard], train.y[shard]).train(
        params, learning_rate=0.1, batch_size=16, local_epochs=1, seed=0, node_id="n", round=1
    )
    change = delta(trained, params)
    layout = model.layout

    def encoder(spec: str) -> Callable[[], bytes]:
        pipeline = parse_spec(spec)

        def encode_once() -> bytes:
            state = error_feedback_init(layout) if pipeline.error_feedback else None
            encoded, _ = pipeline.compress(change, np.random.default_rng(0), state)
            return encode(NodeUpdate(federation="bench", node_id="n", round=1,
                                     base_model_id="0" * 32, num_examples=150, train_loss=0.5,
                                     train_seconds=0.0, delta=encoded,
                                     compression=str(pipeline)))  # fmt: skip

        return encode_once

    def decoder(payload: bytes) -> Callable[[], None]:
        total = WeightedSum(layout)

        def decode_once() -> None:
            update = decode_update(payload, layout=layout)
            total.add(update.delta, update.num_examples)

        return decode_once

    encoders = {spec: encoder(spec) for spec in specs}
    payloads = {spec: encode_once() for spec, encode_once in encoders.items()}
    decoders = {spec: decoder(payload) for spec, payload in payloads.items()}
    encode_s = dict.fromkeys(specs, float("inf"))
    decode_s = dict.fromkeys(specs, float("inf"))
    for _ in range(rounds):
        for spec in specs:
            encode_s[spec] = min(encode_s[spec], _cpu_seconds(encoders[spec]))
            decode_s[spec] = min(decode_s[spec], _cpu_seconds(decoders[spec]))
    return {spec: (encode_s[spec], decode_s[spec], len(payloads[spec])) for spec in specs}


def flat_overhead(model_name: str, spec: str) -> str:
    """Bytes of a flat update that are not positions, codes, scales or values: the
    envelope (ids, round, loss, SPEC, ...) and the flat map's keys and bin headers."""
    model = get_model(model_name)
    rng = np.random.default_rng(0)
    change = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in model.layout.items()}
    encoded, _ = parse_spec(spec).compress(change, rng, None)
    update = NodeUpdate(federation="demo", node_id="node-01", round=1, base_model_id="0" * 32,
                        num_examples=150, train_loss=0.5, train_seconds=1.0, delta=encoded,
                        compression=spec, sent_at=1.0)  # fmt: skip
    payload = encode(update)
    flat = msgpack.unpackb(payload, raw=False)["delta"]
    numbers = sum(len(flat.get(key, b"")) for key in ("upper", "lower", "scales", "data"))
    envelope = len(payload) - len(msgpack.packb(flat, use_bin_type=True))
    return (
        f"{len(payload) - numbers} B ({len(payload)} B payload: {numbers} B of positions and"
        f" values, {envelope} B of envelope, {len(payload) - numbers - envelope} B of flat-map"
        " keys and bin headers)"
    )


def _cpu_seconds(fn: Callable[[], object], calls: int = 10) -> float:
    started = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - started) / calls


def both_ways(model: str, part: str, pairs: list[str], rounds: int, seed: int) -> None:
    """One federation per UP/DOWN pair; bytes both ways against the first pair."""
    print(f"\n{model}, {part}, 10 nodes, {rounds} rounds, seed {seed}: bytes both ways")
    print(f"{'up SPEC / down SPEC':<52} {'up MB':>7} {'down MB':>8} {'(est.)':>7} {'total MB':>8}"
          f" {'vs first':>8} {'final acc':>9} {'Δ pp':>6} {'→95% rnd':>8} {'full B':>7}"
          f" {'compact B':>9}")  # fmt: skip
    first = None
    for pair in pairs:
        up, down = pair.split("/")
        rows = federation(model, part, up, rounds, seed, downlink=down)
        uplink = sum(r["uplink_bytes"] for r in rows)
        delivered = sum(r["downlink_delivered"] or 0 for r in rows)
        estimate = sum(r["downlink_bytes"] for r in rows)
        total = uplink + delivered
        accuracy = rows[-1]["accuracy"]
        first = first or (total, accuracy)
        reach = next((r["round"] for r in rows if r["accuracy"] >= 0.95), "-")
        compact = statistics.median(r["global_delta_bytes"] for r in rows[1:])
        print(f"{pair:<52} {uplink / 1e6:>7.3f} {delivered / 1e6:>8.3f} {estimate / 1e6:>7.3f}"
              f" {total / 1e6:>8.3f} {first[0] / total:>7.1f}x {accuracy:>9.4f}"
              f" {(accuracy - first[1]) * 100:>+6.2f} {reach!s:>8} {rows[-1]['global_bytes']:>7}"
              f" {compact:>9.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-mlp,digits-mlp-large")
    parser.add_argument("--partitions", default="iid,dirichlet:0.5")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0", help="comma-separated; accuracy is the mean")
    parser.add_argument("--codecs-only", action="store_true", help="no federations")
    parser.add_argument("--both-ways", help="UP/DOWN SPEC pairs, comma-separated (issue 16)")
    args = parser.parse_args()
    logs.configure(json=True, level="error")
    if args.both_ways:
        for model in args.models.split(","):
            for part in args.partitions.split(","):
                for seed in (int(x) for x in args.seeds.split(",")):
                    both_ways(model, part, args.both_ways.split(","), args.rounds, seed)
        return
    pipelines = args.pipelines.split(",")
    for model in args.models.split(","):
        dense_numbers = 4 * get_model(model).num_params
        codecs = codec_costs(model, pipelines)
        dense_decode = codecs["dense"][1] if "dense" in codecs else float("nan")
        if args.codecs_only:
            print(f"\n{model}: one update of a round-1 delta")
            print(
                f"{'pipeline':<24} {'B/update':>9} {'enc ms':>7} {'dec+acc ms':>10} {'dec vs dense':>12}"
            )
            for spec, (enc, dec, size) in codecs.items():
                print(f"{spec:<24} {size:>9} {enc * 1e3:>7.2f} {dec * 1e3:>10.3f}"
                      f" {dec / dense_decode:>11.2f}x")  # fmt: skip
            print_overheads(model, pipelines, codecs)
            continue
        for part in args.partitions.split(","):
            seeds = [int(x) for x in args.seeds.split(",")]
            print(
                f"\n{model} ({dense_numbers // 4:,} params), {part}, 10 nodes, {args.rounds} rounds,"
                f" seeds {seeds} (final acc: mean over seeds; rounds to 95%: per seed)"
            )
            print(f"{'pipeline':<24} {'B/update':>9} {'vs dense':>9} {'final acc':>9} {'Δ pp':>6}"
                  f" {'→95% rnd':>8} {'enc ms':>7} {'dec+acc ms':>10} {'dec vs dense':>12}"
                  "  acc per seed")  # fmt: skip
            dense = None
            for spec in pipelines:
                runs = [federation(model, part, spec, args.rounds, seed) for seed in seeds]
                per_update = statistics.mean(
                    r["uplink_bytes"] / r["participants"] for rows in runs for r in rows
                )
                accuracy = statistics.mean(rows[-1]["accuracy"] for rows in runs)
                if spec == "dense":
                    dense = (per_update, accuracy)
                reach = "/".join(
                    str(next((r["round"] for r in rows if r["accuracy"] >= 0.95), "-"))
                    for rows in runs
                )
                ratio = dense[0] / per_update if dense else float("nan")
                diff = (accuracy - dense[1]) * 100 if dense else float("nan")
                enc, dec, _ = codecs[spec]
                print(f"{spec:<24} {per_update:>9.0f} {ratio:>8.1f}x {accuracy:>9.4f} {diff:>+6.2f}"
                      f" {reach:>8} {enc * 1e3:>7.2f} {dec * 1e3:>10.3f}"
                      f" {dec / dense_decode:>11.2f}x  "
                      + "/".join(f"{rows[-1]['accuracy']:.4f}" for rows in runs))  # fmt: skip
        print_overheads(model, pipelines, codecs)


def print_overheads(
    model: str, pipelines: list[str], codecs: dict[str, tuple[float, float, int]]
) -> None:
    dense_numbers = 4 * get_model(model).num_params
    if "dense" in codecs:
        print(
            f"fixed overhead of a dense {model} update: {codecs['dense'][2] - dense_numbers} B"
            f" ({codecs['dense'][2]} B payload, {dense_numbers} B of numbers)"
        )
    for spec in pipelines:
        if parse_spec(spec).framing.flat and not parse_spec(spec).framing.zlib:
            print(f"fixed overhead of a {spec} {model} update: {flat_overhead(model, spec)}")


if __name__ == "__main__":
    main()
