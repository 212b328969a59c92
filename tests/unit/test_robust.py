"""Robust aggregation: the RULE grammar, clipping, coordinate-wise median and trimmed mean,
as plain functions and inside the aggregator (fedavg unchanged, order-independent)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator import robust
from fedmq.aggregator.app import build_aggregator
from fedmq.aggregator.checkpoint import StateDir
from fedmq.aggregator.fedavg import WeightedSum
from fedmq.aggregator.robust import (
    DEFAULT,
    Clip,
    Rule,
    aggregate,
    cap_weights,
    check_memory,
    clip_factors,
    coordinate_median,
    parse_rule,
    scaled,
    trimmed_mean,
    update_norm,
    with_clip,
)
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.cli import build_parser
from fedmq.mqtt import BrokerAddress
from fedmq.schemas import decode_metrics
from fedmq.schemas.encodings import MAX_ABS, Quantized, Sparse, to_dense
from fedmq.schemas.messages import MAX_EXAMPLES, MAX_LOSS
from tests.unit.test_aggregator_server import MODEL, TOPICS, Harness

LAYOUT = {"w": (3, 4), "b": (5,)}


def random_delta(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.normal(0, scale, s)).astype(np.float32) for n, s in LAYOUT.items()}


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(delta[n], dtype=np.float64).reshape(-1) for n in LAYOUT])


# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("fedavg", "fedavg"),
        ("median", "median"),
        ("trimmed-mean:0.2", "trimmed-mean:0.2"),
        ("trimmed-mean:0", "trimmed-mean:0"),
        ("clip-norm:5", "fedavg+clip-norm:5"),
        ("fedavg+clip-norm:2.5", "fedavg+clip-norm:2.5"),
        ("median+clip-median:2", "median+clip-median:2"),
        ("trimmed-mean:0.10+clip-norm:1e3", "trimmed-mean:0.1+clip-norm:1000"),
        ("cap-examples:1", "fedavg+cap-examples:1"),
        ("clip-median:2+cap-examples:1.5", "fedavg+clip-median:2+cap-examples:1.5"),
        ("fedavg+clip-median:2+cap-examples:1", "fedavg+clip-median:2+cap-examples:1"),
    ],
)
def test_rules_parse_to_their_canonical_text(text: str, canonical: str) -> None:
    rule = parse_rule(text)
    assert str(rule) == canonical
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    "text",
    [
        "", "mean", "fedavg:1", "median:0.2", "trimmed-mean", "trimmed-mean:0.5",
        "trimmed-mean:-0.1", "trimmed-mean:x", "clip-norm:0", "clip-norm:-1", "clip-norm:inf",
        "clip-norm", "median+", "median+clip-norm:1+clip-norm:2", "median+median",
        "clip-norm:1+median", "trimmed-mean:nan", "median+cap-examples:1",
        "trimmed-mean:0.2+clip-median:2+cap-examples:2", "cap-examples:0.5", "cap-examples",
        "cap-examples:inf", "fedavg+cap-examples:1+clip-norm:1", "cap-examples:1+cap-examples:2",
        "fedavg+clip-norm:1+clip-median:2+cap-examples:1",
    ],
)  # fmt: skip
def test_bad_rules_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_rule(text)


def test_a_second_clip_is_refused() -> None:
    with pytest.raises(ValueError, match="already clips"):
        with_clip(parse_rule("median+clip-norm:1"), Clip(2.0))
    assert with_clip(parse_rule("median"), Clip(2.0)) == parse_rule("median+clip-norm:2")


def test_plain_fedavg_is_only_the_unclipped_one() -> None:
    assert parse_rule("fedavg").plain and Rule().plain
    assert not parse_rule("fedavg+clip-norm:1").plain
    assert not parse_rule("fedavg+cap-examples:4").plain
    assert not parse_rule("median").plain
    assert not DEFAULT.plain
    assert parse_rule(str(DEFAULT)) == DEFAULT


# --------------------------------------------------------------------------- the default


@settings(max_examples=200, deadline=None)
@given(
    honest=st.lists(st.integers(1, MAX_EXAMPLES), min_size=2, max_size=30),
    hostile=st.integers(1, MAX_EXAMPLES),
    factor=st.sampled_from([1.0, 1.5, 2.0, 4.0]),
)
def test_one_claim_cannot_raise_the_examples_cap(
    honest: list[int], hostile: int, factor: float
) -> None:
    """Whatever one node claims, the cap stays within C x the honest claims' range, so it
    weighs at most C x the largest honest claim; claims at or below the cap are kept."""
    claims = [*honest, hostile]
    weights, cap = cap_weights(claims, factor)
    assert 1 <= cap <= factor * max(honest)
    assert weights[-1] <= factor * max(honest)
    assert all(w == min(c, cap) for w, c in zip(weights, claims, strict=True))
    assert cap_weights(claims[::-1], factor) == (weights[::-1], cap)  # order-free


def honest_round(rng: np.random.Generator, n: int = 9) -> list[tuple[dict, int]]:
    """n honest updates as on an IID split: equal norms (none is clipped, with or without
    one hostile update) and equal example counts (none is capped)."""
    deltas = [random_delta(rng) for _ in range(n)]
    return [({k: (v * np.float32(0.05 / update_norm(d))) for k, v in d.items()}, 150)
            for d in deltas]  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12))
def test_the_default_leaves_an_iid_honest_round_bitwise_plain_fedavg(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [(random_delta(rng, 0.01), 150) for _ in range(n)]
    total = WeightedSum(LAYOUT)
    for delta, weight in updates:
        total.add(delta, weight)
    outcome = aggregate(DEFAULT, updates, LAYOUT)
    if outcome.clipped == 0:  # an honest norm beyond twice the median is clipped, by design
        assert all(outcome.delta[n].tobytes() == total.mean()[n].tobytes() for n in LAYOUT)
    assert outcome.capped == 0 and outcome.weights == [150] * n


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    claim=st.integers(1, MAX_EXAMPLES),
    magnitude=st.sampled_from([1e-3, 1.0, 1e6, 1e14, MAX_ABS]),
    flip=st.booleans(),
)
def test_one_hostile_update_moves_the_default_by_a_bounded_amount(
    seed: int, claim: int, magnitude: float, flip: bool
) -> None:
    """Nine honest updates and one hostile one (any claim, any values within the schema's
    limits): it weighs at most the median claim and counts with at most twice the median
    norm, so it moves the mean by at most w / (W + w) x (2 x median norm + |honest mean|)
    (plain FedAvg: by up to ~1e15)."""
    rng = np.random.default_rng(seed)
    honest = honest_round(rng)
    plain_mean = aggregate(parse_rule("fedavg"), honest, LAYOUT).delta
    if flip:  # the honest mean's direction, reversed and blown up
        bad = {n: (-magnitude * plain_mean[n] / np.abs(flat(plain_mean)).max()) for n in LAYOUT}
    else:
        bad = {n: rng.choice([-magnitude, magnitude], s) for n, s in LAYOUT.items()}
    bad = {n: np.clip(v, -MAX_ABS, MAX_ABS).astype(np.float32) for n, v in bad.items()}
    outcome = aggregate(DEFAULT, [*honest, (bad, claim)], LAYOUT)
    norms = sorted(update_norm(d) for d, _ in honest)
    w, honest_weight = outcome.weights[-1], sum(outcome.weights[:-1])
    assert w <= 187 and outcome.examples_cap == 187 and outcome.clipped <= 1  # 1.25 x 150
    assert outcome.clip_bound is not None and outcome.clip_bound <= 2 * norms[-1] * (1 + 1e-6)
    moved = np.linalg.norm(flat(outcome.delta) - flat(plain_mean))
    bound = w / (honest_weight + w) * (outcome.clip_bound + np.linalg.norm(flat(plain_mean)))
    assert moved <= bound * (1 + 1e-5) + 1e-9
    assert moved < np.linalg.norm(flat(plain_mean)) * 3


# --------------------------------------------------------------------------- clipping


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 9),
    bound=st.floats(1e-3, 1e3),
    scales=st.lists(st.floats(1e-4, 1e4), min_size=9, max_size=9),
)
def test_clipping_bounds_every_norm_and_keeps_small_updates(
    seed: int, n: int, bound: float, scales: list[float]
) -> None:
    rng = np.random.default_rng(seed)
    deltas = [random_delta(rng, scales[i]) for i in range(n)]
    norms = [update_norm(d) for d in deltas]
    factors, used = clip_factors(norms, Clip(bound))
    assert used == bound
    for delta, norm, factor in zip(deltas, norms, factors, strict=True):
        after = update_norm(scaled(delta, factor))
        assert after <= bound * (1 + 1e-6)
        if norm <= bound:
            assert factor == 1.0
        else:  # the direction is kept
            np.testing.assert_allclose(flat(scaled(delta, factor)), flat(delta) * bound / norm,
                                       rtol=1e-5, atol=1e-30)  # fmt: skip


def test_adaptive_clip_uses_the_median_norm_times_the_factor() -> None:
    factors, bound = clip_factors([1.0, 2.0, 3.0, 100.0, 4.0], Clip(1.5, adaptive=True))
    assert bound == 4.5
    assert factors == [1.0, 1.0, 1.0, 0.045, 1.0]
    assert clip_factors([4.0, 100.0, 3.0, 1.0, 2.0], Clip(1.5, adaptive=True))[1] == bound


def test_norm_and_scaling_of_quantized_and_sparse_forms() -> None:
    quantized = Quantized(
        shape=(2, 3), bits=8, chunk=4,
        scales=np.array([0.5, 2.0], np.float32), codes=np.array([1, -2, 3, 0, 5, -1], np.int8),
    )  # fmt: skip
    sparse = Sparse(shape=(5,), indices=np.array([1, 4]), values=np.array([3.0, -4.0], np.float32))
    delta = {"w": quantized, "b": sparse}
    dense = {name: to_dense(t) for name, t in delta.items()}
    assert update_norm(delta) == pytest.approx(np.linalg.norm(flat_any(dense)))
    half = scaled(delta, 0.5)
    assert isinstance(half["w"], Quantized) and isinstance(half["b"], Sparse)
    for name in delta:
        np.testing.assert_allclose(to_dense(half[name]), dense[name] * 0.5)


def flat_any(delta: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in delta.values()])


# --------------------------------------------------------------------------- median, trimmed


RULES = [
    lambda ds, fs=None: coordinate_median(ds, LAYOUT, fs),
    lambda ds, fs=None: trimmed_mean(ds, LAYOUT, 0.2, fs),
    lambda ds, fs=None: trimmed_mean(ds, LAYOUT, 0.0, fs),
]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), which=st.integers(0, 2))
def test_identical_updates_give_that_update(seed: int, n: int, which: int) -> None:
    delta = random_delta(np.random.default_rng(seed))
    result = RULES[which]([delta] * n)
    for name in LAYOUT:
        assert result[name].dtype == np.float64
        np.testing.assert_array_equal(result[name], delta[name].astype(np.float64))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), which=st.integers(0, 2))
def test_bitwise_independent_of_the_order_of_updates(seed: int, n: int, which: int) -> None:
    rng = np.random.default_rng(seed)
    deltas = [random_delta(rng, float(rng.uniform(0.1, 100))) for _ in range(n)]
    factors = [float(f) for f in rng.uniform(0.1, 1.0, n)]
    order = rng.permutation(n)
    first = RULES[which](deltas, factors)
    second = RULES[which]([deltas[i] for i in order], [factors[i] for i in order])
    for name in LAYOUT:
        assert first[name].tobytes() == second[name].tobytes()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    honest=st.integers(3, 12),
    outliers=st.integers(0, 5),
    magnitude=st.sampled_from([1e2, 1e6, 1e12]),
    rule=st.sampled_from(["median", "trimmed-mean:0.3", "trimmed-mean:0.45"]),
)
def test_a_minority_of_huge_outliers_stays_within_the_honest_range(
    seed: int, honest: int, outliers: int, magnitude: float, rule: str
) -> None:
    parsed = parse_rule(rule)

    def tolerated(f: int) -> bool:  # median: f < n / 2; trimmed: f <= floor(beta * n)
        return f < honest if parsed.kind == "median" else f <= int(parsed.trim * (honest + f))

    while not tolerated(outliers):
        outliers -= 1
    n = honest + outliers
    rng = np.random.default_rng(seed)
    good = [random_delta(rng) for _ in range(honest)]
    bad = [
        {k: (rng.choice([-1, 1], v.shape) * magnitude).astype(np.float32) for k, v in d.items()}
        for d in (random_delta(rng) for _ in range(outliers))
    ]
    mixed = good + bad
    order = rng.permutation(n)
    result = aggregate(parsed, [(mixed[i], 1) for i in order], LAYOUT).delta
    stacked = np.stack([flat(d) for d in good])
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    got = flat(result)
    assert (got >= low - 1e-12).all() and (got <= high + 1e-12).all()


def test_even_count_median_and_trim_counts() -> None:
    values = [np.float32(v) for v in (1, 2, 3, 100)]
    deltas = [{"x": np.array([v], np.float32)} for v in values]
    assert coordinate_median(deltas, {"x": (1,)})["x"][0] == 2.5
    # floor(0.2 * 4) = 0: nothing trimmed; floor(0.25 * 4) = 1 from each side
    assert trimmed_mean(deltas, {"x": (1,)}, 0.2)["x"][0] == 26.5
    assert trimmed_mean(deltas, {"x": (1,)}, 0.25)["x"][0] == 2.5


@pytest.mark.parametrize("bits", [8, 1])
@pytest.mark.parametrize("work", [1, 7, 1 << 20])
def test_compressed_forms_and_blocks_agree_with_dense(
    work: int, bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantized and sparse updates read block by block give what their dense form gives."""
    monkeypatch.setattr(robust, "WORK_FLOATS", work)
    rng = np.random.default_rng(3)
    layout = {"w": (7, 9), "b": (11,)}
    deltas = []
    for i in range(5):
        codes = (rng.integers(-127, 128, 63) if bits == 8 else rng.choice([-1, 1], 63)).astype(
            np.int8
        )
        quantized = Quantized((7, 9), bits, 10, rng.uniform(0, 1, 7).astype(np.float32), codes)
        positions = np.sort(rng.choice(11, size=i + 1, replace=False))
        values = rng.normal(0, 1, i + 1).astype(np.float32)
        sparse = Sparse((11,), positions.astype(np.int64), values)
        deltas.append({"w": quantized, "b": sparse} if i % 2 else {"w": to_dense(quantized),
                                                                    "b": sparse})  # fmt: skip
    dense = [{name: to_dense(t) for name, t in d.items()} for d in deltas]
    factors = [1.0, 0.5, 1.0, 0.25, 1.0]
    for rule in (coordinate_median, lambda ds, lay, fs: trimmed_mean(ds, lay, 0.2, fs)):
        got, want = rule(deltas, layout, factors), rule(dense, layout, factors)
        for name in layout:
            assert got[name].tobytes() == want[name].tobytes()
    np.testing.assert_array_equal(
        coordinate_median(dense, layout)["b"],
        np.median(np.stack([d["b"] for d in dense]).astype(np.float64), axis=0),
    )


def test_shapes_must_match_the_layout() -> None:
    with pytest.raises(ValueError, match="shape"):
        coordinate_median([{"w": np.zeros((4, 3), np.float32), "b": np.zeros(5)}], LAYOUT)
    with pytest.raises(ValueError, match="no update"):
        aggregate(parse_rule("median"), [], LAYOUT)


def test_unclipped_fedavg_rule_is_the_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    updates = [(random_delta(rng), int(w)) for w in rng.integers(1, 500, 6)]
    total = WeightedSum(LAYOUT)
    for delta, weight in updates:
        total.add(delta, weight)
    got = aggregate(parse_rule("fedavg"), updates, LAYOUT)
    for name in LAYOUT:
        assert got.delta[name].tobytes() == total.mean()[name].tobytes()
    clipped = aggregate(parse_rule("fedavg+clip-norm:0.5"), updates, LAYOUT)
    assert clipped.clipped == sum(update_norm(d) > 0.5 for d, _ in updates)
    assert np.linalg.norm(flat(clipped.delta)) <= 0.5 * (1 + 1e-6)


# --------------------------------------------------------------------------- memory


def test_memory_bound_refuses_what_cannot_fit() -> None:
    check_memory(parse_rule("median"), nodes=10, update_bytes=10_000, model_floats=2410)
    check_memory(parse_rule("fedavg+clip-norm:1"), nodes=10**6, update_bytes=10**7,
                 model_floats=10**6)  # fmt: skip  # streams: never refused
    with pytest.raises(ValueError, match=r"holds every update of a round at once.*MiB limit"):
        check_memory(parse_rule("median"), nodes=1000, update_bytes=4 * 10**6 + 65536,
                     model_floats=10**6)  # fmt: skip
    small = robust.memory_bound(parse_rule("median"), nodes=10, update_bytes=9_640,
                                model_floats=2410)  # fmt: skip
    assert small == 10 * 9_640 + 4 * robust.WORK_FLOATS + 8 * 2410


def test_refused_at_start_up_by_settings_config_and_cli() -> None:
    base = Harness().settings
    with pytest.raises(ValueError, match="MiB limit"):
        replace(
            base,
            aggregation=parse_rule("trimmed-mean:0.1"),
            policy=RoundPolicy(expected_nodes=100_000, min_nodes=1),
        )
    config = AggregatorSettings(
        broker=BrokerAddress(), federation="f", nodes=300_000, aggregation="median",
        test_data=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="MiB limit"):
        build_aggregator(config, lambda topic, payload, retain: None)
    with pytest.raises(ValueError, match="already clips"):
        build_aggregator(
            replace(config, nodes=10, aggregation="median+clip-norm:1", clip_norm=2.0),
            lambda topic, payload, retain: None,
        )
    built = build_aggregator(
        replace(config, nodes=10, aggregation="trimmed-mean:0.2", clip_norm=2.0),
        lambda topic, payload, retain: None,
    )
    assert str(built.settings.aggregation) == "trimmed-mean:0.2+clip-norm:2"


def test_clip_norm_replaces_the_default_clip_and_keeps_its_cap() -> None:
    config = AggregatorSettings(broker=BrokerAddress(), federation="f", test_data=None)
    built = build_aggregator(config, lambda topic, payload, retain: None)
    assert built.settings.aggregation == DEFAULT
    built = build_aggregator(replace(config, clip_norm=2.0), lambda topic, payload, retain: None)
    assert str(built.settings.aggregation) == "fedavg+clip-norm:2+cap-examples:1.25"
    with pytest.raises(ValueError, match="already clips"):  # a clip the operator chose
        build_aggregator(
            replace(config, aggregation="fedavg+clip-median:3", clip_norm=2.0),
            lambda topic, payload, retain: None,
        )


def test_the_bound_counts_the_updates_a_round_can_take() -> None:
    base = replace(Harness().settings, aggregation=parse_rule("median"))
    fleet = frozenset(f"n{i}" for i in range(200_000))
    sampled = replace(
        base,
        known_nodes=fleet,
        policy=RoundPolicy(expected_nodes=10, min_nodes=1, sample_fraction=0.0001),
    )
    assert sampled.most_updates_per_round == 20  # the sample, not the fleet
    assert replace(base, known_nodes=fleet).most_updates_per_round == 3  # closes at 3
    with pytest.raises(ValueError, match="MiB limit"):
        replace(sampled, policy=RoundPolicy(expected_nodes=10, min_nodes=1, sample_fraction=0.5))


def test_cli_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["aggregator", "--aggregation", "trimmed-mean:0.20", "--clip-norm", "3"]
    )
    assert (args.aggregation, args.clip_norm) == ("trimmed-mean:0.2", 3.0)
    default = build_parser().parse_args(["aggregator"]).aggregation
    config = AggregatorSettings(broker=BrokerAddress(), federation="f")
    assert default == str(DEFAULT) == config.aggregation
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["aggregator", "--aggregation", "mean"])
    assert exit_.value.code == 2
    assert "aggregation 'mean' is not fedavg, median or trimmed-mean" in capsys.readouterr().err


# --------------------------------------------------------------------------- in the aggregator


def robust_harness(rule: str, store: StateDir | None = None, nodes: int = 3) -> Harness:
    """The unit Harness with its aggregator rebuilt under ``rule``."""
    h = Harness(policy=RoundPolicy(expected_nodes=nodes, min_nodes=nodes))
    h.settings = replace(h.settings, aggregation=parse_rule(rule))
    h.agg = Aggregator(
        h.settings,
        h.initial,
        publish=lambda topic, payload, retain: h.published.append((topic, payload, retain)),
        clock=h.clock,
        wall_clock=lambda: 1.7e9,
        store=store,
    )
    return h


def run_round(h: Harness, order: list[int], scale: float = 1.0) -> None:
    h.agg.start()
    payloads = []
    for i in range(3):
        rng = np.random.default_rng(i)
        delta = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in MODEL.layout.items()}
        if i == 2:
            delta = {n: v * np.float32(scale) for n, v in delta.items()}
        payloads.append(h.update(f"n{i}", delta=delta, num_examples=10 + i)[0])
    for i in order:
        h.send(f"n{i}", payloads[i])


def test_plain_fedavg_rule_changes_neither_model_nor_metrics() -> None:
    default, explicit = Harness(), robust_harness("fedavg")
    run_round(default, [2, 0, 1])
    run_round(explicit, [2, 0, 1])
    assert default.agg.model_id == explicit.agg.model_id
    assert default.metrics()[0].extra == explicit.metrics()[0].extra == {}
    assert default.settings.fingerprint == robust_harness("median").settings.fingerprint


@pytest.mark.parametrize("rule", ["median", "trimmed-mean:0.34", "fedavg+clip-median:1"])
def test_robust_rules_in_the_aggregator_ignore_arrival_order(rule: str) -> None:
    first, second = robust_harness(rule), robust_harness(rule)
    run_round(first, [0, 1, 2], scale=1e6)
    run_round(second, [2, 1, 0], scale=1e6)
    assert first.agg.model_id == second.agg.model_id
    sent = decode_metrics(first.on(TOPICS.metrics)[0][0])
    assert sent.extra["aggregation"] == str(parse_rule(rule))
    assert sent.num_examples == 33
    assert sent.train_loss == pytest.approx(1.25)
    if "clip" in rule:
        assert sent.extra["clipped"] >= 1 and sent.extra["clip_bound"] > 0
    change = max(np.abs(first.agg.params[n] - first.initial[n]).max() for n in MODEL.layout)
    assert change < 0.1  # the 1e6-times update did not get through
    plain = Harness()
    run_round(plain, [0, 1, 2], scale=1e6)
    assert max(np.abs(plain.agg.params[n] - plain.initial[n]).max() for n in MODEL.layout) > 100


def test_the_default_in_the_aggregator_caps_a_claim_and_clips_a_delta() -> None:
    """A node claiming 2**24 examples, the largest loss and a delta 1e6 times too big
    counts for 1.25 x the median claim with twice the median norm, in the model and the
    metrics."""
    h = robust_harness(str(DEFAULT))
    h.agg.start()
    for i in range(3):
        rng = np.random.default_rng(i)
        delta = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in MODEL.layout.items()}
        if i < 2:
            h.report(f"n{i}", delta=delta, num_examples=10)
        else:
            delta = {n: v * np.float32(-1e6) for n, v in delta.items()}
            h.report("n2", delta=delta, num_examples=MAX_EXAMPLES, train_loss=MAX_LOSS)
    (metrics,) = h.metrics()
    assert metrics.extra == {
        "aggregation": "fedavg+clip-median:2+cap-examples:1.25",
        "clipped": 1,
        "clip_bound": metrics.extra["clip_bound"],
        "capped": 1,
        "examples_cap": 12,  # 1.25 x 10, rounded down
    }
    assert metrics.num_examples == 20 + MAX_EXAMPLES  # as claimed
    assert metrics.train_loss == pytest.approx((1.25 * 20 + MAX_LOSS * 12) / 32)
    change = max(np.abs(h.agg.params[n] - h.initial[n]).max() for n in MODEL.layout)
    assert change < 0.1


@pytest.mark.parametrize(
    "rule", ["median", "trimmed-mean:0.2+clip-median:1", "fedavg+clip-median:1+cap-examples:1"]
)
def test_a_crash_and_resume_gives_bitwise_the_same_model(rule: str, tmp_path: Path) -> None:
    nodes = [f"n{i}" for i in range(5)]

    def send(h: Harness, who: list[str]) -> None:
        for node in who:
            seed = 100 * h.agg.round + int(node[1:])
            h.report(node, seed=seed, num_examples=10 + int(node[1:]))

    straight = robust_harness(rule, nodes=5)
    straight.agg.start()
    for _ in range(3):
        send(straight, nodes)

    store = StateDir(tmp_path)
    first = robust_harness(rule, store, nodes=5)
    first.agg.start()
    send(first, nodes)
    send(first, nodes[3:])  # round 2, half-way: then the process dies
    store.close()
    store = StateDir(tmp_path)
    again = robust_harness(rule, store, nodes=5)
    checkpoint = store.load()
    assert checkpoint is not None
    store.open_journal(checkpoint.version)
    again.agg.resume(checkpoint, store.journal_records(checkpoint.version))
    send(again, nodes[:3])
    send(again, nodes)
    store.close()
    assert again.agg.done and straight.agg.done
    assert again.agg.model_id == straight.agg.model_id
    assert [m.extra for m in again.agg.history] == [m.extra for m in straight.agg.history]
