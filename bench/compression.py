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
total against the first pair's, and the sizes of one full and one compact model. The
total includes the final model's delivery, which no round's metrics count: the report's
``final_downlink_delivered`` (the nodes' counts, from the server's ``done``), checked
against the final model's compact form (read from the aggregator's checkpoint) times
the 10 nodes; a run where they differ says so. ``UP/DOWN/FINAL`` sends the final model
as FINAL (``--final-downlink-compression``).
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
    model: str, part: str, spec: str, rounds: int, seed: int, downlink: str = "none",
    sample_fraction: float | None = None, final: str = "same",
) -> tuple[list[dict], int, int | None]:  # fmt: skip
    """The report's rows, the size of the final model's compact form as published (read
    from the aggregator's last checkpoint), and what the nodes reported receiving of the
    final model (the report's ``final_downlink_delivered``; None if it has none)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        config = DemoSettings(nodes=10, rounds=rounds, model=model, partition=part, seed=seed,
                            compression=spec, downlink_compression=downlink,
                            final_downlink_compression=final, sample_fraction=sample_fraction,
                            report=report, workdir=Path(tmp) / "w")  # fmt: skip
        with open("/dev/null", "w") as quiet:
            if run(config, threading.Event(), out=quiet) != 0:
                raise RuntimeError(f"federation {model} {part} {spec} failed")
        kept = Path(tmp) / "w" / "aggregator" / "checkpoint.msgpack"
        checkpoint = msgpack.unpackb(kept.read_bytes(), raw=False)
        written = json.loads(report.read_text())
        return (
            written["rounds"],
            len(checkpoint["global_delta"]),
            written.get("final_downlink_delivered"),
        )


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


TARGET = 0.95  # the accuracy "bytes to reach" counts up to


def both_ways_row(
    rows: list[dict], final: int, nodes: int = 10, final_delivered: int | None = None
) -> dict:
    """One federation's figures: bytes up (accepted) and down (delivered, and the old
    estimate), final accuracy, the round and the bytes both ways (cumulative, that round
    included) at which the central accuracy first reached TARGET, one full and the
    median compact model's size. The final model, which every node receives after the
    last round and no round's ``downlink_delivered`` counts, is ``final_down`` and in
    ``total``: what the nodes reported receiving of it (``final_delivered``, the
    report's), else its compact form (``final`` bytes) times ``nodes``; ``final_agrees``
    says whether the two agree (None without the report's). ``rounds_total`` is what
    earlier tables called total (rounds 1 to the last only)."""
    assumed = final * nodes
    final_down = assumed if final_delivered is None else final_delivered
    uplink = [r["uplink_bytes"] for r in rows]
    delivered = [r["downlink_delivered"] or 0 for r in rows]
    reach = next((i for i, r in enumerate(rows) if r["accuracy"] >= TARGET), None)
    compact = [r["global_delta_bytes"] for r in rows[1:] if r["global_delta_bytes"] is not None]
    return {
        "up": sum(uplink),
        "down": sum(delivered),
        "estimate": sum(r["downlink_bytes"] for r in rows),
        "final_compact": final,
        "final_down": final_down,
        "final_agrees": None if final_delivered is None else final_delivered == assumed,
        "rounds_total": sum(uplink) + sum(delivered),
        "total": sum(uplink) + sum(delivered) + final_down,
        "accuracy": rows[-1]["accuracy"],
        "reach_round": None if reach is None else rows[reach]["round"],
        # the last round's accuracy is the final model's: reaching it includes its delivery
        "reach_bytes": None
        if reach is None
        else sum(uplink[: reach + 1] + delivered[: reach + 1])
        + (final_down if reach == len(rows) - 1 else 0),
        "full": rows[-1]["global_bytes"],
        "compact": statistics.median(compact) if compact else None,
        "round1_down": delivered[0],
    }


def both_ways(
    model: str, part: str, pairs: list[str], rounds: int, seed: int,
    sample_fraction: float | None = None,
) -> list[dict]:  # fmt: skip
    """One federation per UP/DOWN pair, in turn; bytes both ways against the first pair.
    Returns one ``both_ways_row`` per pair, tagged with what ran."""
    fraction = "" if sample_fraction is None else f", sample fraction {sample_fraction}"
    print(f"\n{model}, {part}, 10 nodes, {rounds} rounds, seed {seed}{fraction}: bytes both ways")
    print(f"{'up SPEC / down SPEC':<52} {'up MB':>7} {'down MB':>8} {'(est.)':>7} {'total MB':>8}"
          f" {'vs first':>8} {'final acc':>9} {'Δ pp':>6} {'→95% rnd':>8} {'→95% MB':>8}"
          f" {'full B':>7} {'compact B':>9} {'rnd1 down B':>11} {'final B':>7}")  # fmt: skip
    first = None
    made = []
    for pair in pairs:
        up, down, *final = pair.split("/")  # UP/DOWN or UP/DOWN/FINAL
        rows, final_bytes, final_delivered = federation(
            model, part, up, rounds, seed, down, sample_fraction, *final
        )
        row = both_ways_row(rows, final_bytes, final_delivered=final_delivered) | {
            "model": model, "partition": part, "seed": seed, "pair": pair,
            "sample_fraction": sample_fraction or 1.0,
        }  # fmt: skip
        made.append(row)
        first = first or row
        reach_mb = "-" if row["reach_bytes"] is None else f"{row['reach_bytes'] / 1e6:.3f}"
        compact = "-" if row["compact"] is None else f"{row['compact']:.0f}"
        print(f"{pair:<52} {row['up'] / 1e6:>7.3f} {row['down'] / 1e6:>8.3f}"
              f" {row['estimate'] / 1e6:>7.3f} {row['total'] / 1e6:>8.3f}"
              f" {first['total'] / row['total']:>7.1f}x {row['accuracy']:>9.4f}"
              f" {(row['accuracy'] - first['accuracy']) * 100:>+6.2f} {row['reach_round']!s:>8}"
              f" {reach_mb:>8} {row['full']:>7} {compact:>9} {row['round1_down']:>11}"
              f" {row['final_compact']:>7}",
              flush=True)  # fmt: skip
        if row["final_agrees"] is not True:  # no count, or not the compact form x 10
            print(f"  final model: the nodes reported {final_delivered} B, its compact form"
                  f" x 10 is {row['final_compact'] * 10} B; the total counts"
                  f" {row['final_down']} B", flush=True)  # fmt: skip
    return made


def trade_off(made: list[dict]) -> None:
    """Per (partition, sample fraction, pair), over the seeds that ran: total bytes, ratio
    against the first pair of the same seed, final accuracy and its difference from the
    first pair's, bytes to reach TARGET."""
    first: dict[tuple, dict] = {}
    for row in made:
        first.setdefault((row["partition"], row["sample_fraction"], row["seed"]), row)
    groups: dict[tuple, list[dict]] = {}
    for row in made:
        groups.setdefault((row["partition"], row["sample_fraction"], row["pair"]), []).append(row)
    print("\ntrade-off: mean over seeds (the first pair of each seed is the baseline)")
    print(f"{'partition':<14} {'frac':>4} {'up SPEC / down SPEC':<52} {'seeds':>5} {'total MB':>8}"
          f" {'vs first':>8} {'final acc':>9} {'Δ pp':>6} {'→95% MB':>8}")  # fmt: skip
    for (part, fraction, pair), rows in groups.items():
        bases = [first[(part, fraction, r["seed"])] for r in rows]
        ratio = statistics.mean(b["total"] / r["total"] for b, r in zip(bases, rows, strict=True))
        diff = statistics.mean(
            (r["accuracy"] - b["accuracy"]) * 100 for b, r in zip(bases, rows, strict=True)
        )
        reach = [r["reach_bytes"] for r in rows]
        reach_mb = "-" if None in reach else f"{statistics.mean(reach) / 1e6:.3f}"
        print(f"{part:<14} {fraction:>4} {pair:<52} {len(rows):>5}"
              f" {statistics.mean(r['total'] for r in rows) / 1e6:>8.3f} {ratio:>7.1f}x"
              f" {statistics.mean(r['accuracy'] for r in rows):>9.4f} {diff:>+6.2f}"
              f" {reach_mb:>8}")  # fmt: skip


def plot_trade_off(made: list[dict], path: Path) -> None:
    """Total bytes (log scale) against final accuracy, one point per run, one colour per
    pair; needs matplotlib (the ``plot`` extra), else says so and draws nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from fedmq.plot import NEEDS_MATPLOTLIB

        print(f"no plot: {NEEDS_MATPLOTLIB}")
        return
    figure, axes = plt.subplots(figsize=(8, 5))
    pairs = list(dict.fromkeys(r["pair"] for r in made))
    kinds = list(dict.fromkeys((r["partition"], r["sample_fraction"]) for r in made))
    for index, pair in enumerate(pairs):
        for marker, (part, fraction) in zip("os^vDP", kinds, strict=False):
            rows = [r for r in made
                    if (r["pair"], r["partition"], r["sample_fraction"]) == (pair, part, fraction)]  # fmt: skip
            sampled = "" if fraction == 1 else f", sample {fraction}"
            if rows:
                axes.scatter([r["total"] / 1e6 for r in rows], [r["accuracy"] for r in rows],
                             color=f"C{index}", marker=marker, label=f"{pair} ({part}{sampled})")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("total bytes, up + delivered down (MB)")
    axes.set_ylabel("final accuracy")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-mlp,digits-mlp-large")
    parser.add_argument("--partitions", default="iid,dirichlet:0.5")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0", help="comma-separated; accuracy is the mean")
    parser.add_argument("--codecs-only", action="store_true", help="no federations")
    parser.add_argument("--both-ways", help="UP/DOWN SPEC pairs, comma-separated (issue 16); "
                        "UP/DOWN/FINAL sends the final model as FINAL "
                        "(--final-downlink-compression)")  # fmt: skip
    parser.add_argument("--sample-fractions", default="1",
                        help="with --both-ways: comma-separated, each a grid of its own")  # fmt: skip
    parser.add_argument("--json", type=Path, help="with --both-ways: write every run's row here")
    parser.add_argument("--plot", type=Path, help="with --both-ways: the trade-off chart (PNG)")
    parser.add_argument("--from-json", help="with --plot or alone: no runs, the trade-off of "
                        "these --json files (comma-separated)")  # fmt: skip
    args = parser.parse_args()
    logs.configure(json=True, level="error")
    if args.from_json:
        made = [
            row for name in args.from_json.split(",") for row in json.loads(Path(name).read_text())
        ]
        trade_off(made)
        if args.plot:
            plot_trade_off(made, args.plot)
        return
    if args.both_ways:
        made: list[dict] = []
        for model in args.models.split(","):
            for part in args.partitions.split(","):
                for fraction in (float(x) for x in args.sample_fractions.split(",")):
                    for seed in (int(x) for x in args.seeds.split(",")):
                        made += both_ways(model, part, args.both_ways.split(","), args.rounds,
                                          seed, None if fraction == 1 else fraction)  # fmt: skip
                        if args.json:  # after every seed: a cut-short grid keeps its runs
                            args.json.write_text(json.dumps(made, indent=1))
        trade_off(made)
        if args.plot:
            plot_trade_off(made, args.plot)
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
                runs = [federation(model, part, spec, args.rounds, seed)[0] for seed in seeds]
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
