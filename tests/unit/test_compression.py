"""Compression of deltas: SPEC parsing, transforms, wire encodings, error feedback, the
aggregator's acceptance rules, hostile encodings and the node's saved residual."""

import copy
import gc
import itertools
import math
import warnings
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from structlog.testing import capture_logs

from fedmq.aggregator.fedavg import CHUNK, WeightedSum, fedavg
from fedmq.aggregator.intake import Intake
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
from fedmq.compression import Pipeline, parse_spec
from fedmq.compression.transforms import (
    EmptyState,
    ErrorFeedbackState,
    Stage,
    chain,
    compress_tree,
    error_feedback,
    error_feedback_init,
    quantize_values,
    sign_values,
    top_k,
    top_k_pooled,
)
from fedmq.models import get_model
from fedmq.node import residual
from fedmq.node.residual import SavedResidual
from fedmq.schemas import (
    GlobalModel,
    NodeUpdate,
    SchemaError,
    Topics,
    TrainingPlan,
    decode_global,
    decode_metrics,
    decode_update,
    encode,
    model_id_of,
)
from fedmq.schemas.encodings import (
    MAX_SCALE,
    Quantized,
    Sparse,
    decode_encoded,
    decode_varints,
    encode_encoded,
    encode_varints,
    float16_into,
    to_dense,
    value_problem,
)
from fedmq.schemas.framing import Framing

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every pipeline the grammar allows, as (Pipeline, canonical SPEC).
FRACTIONS = {0.1: "0.1", 0.5: "0.5", 1.0: "1"}
VALUE_CODINGS = (None, "fp16", "int8", "int4", "sign")
PIPELINE_CHOICES = [
    (top, values, ef, flat, packed)
    for top in (None, *FRACTIONS)
    for values in VALUE_CODINGS
    for ef in (False, True)
    for flat in ((False, True) if top is not None else (False,))  # flat needs topk
    for packed in (False, True)
]
ALL_PIPELINES = [
    Pipeline(top_k=top, values=values, error_feedback=ef, framing=Framing(flat, packed))
    for top, values, ef, flat, packed in PIPELINE_CHOICES
]


def canonical(
    top: float | None, values: str | None, ef: bool, packed: bool, flat: bool = False
) -> str:
    stages = [f"topk:{FRACTIONS[top]}"] if top is not None else []
    stages += [values] if values else []
    stages += ["ef"] if ef else []
    stages += ["flat"] if flat else []
    stages += ["zlib"] if packed else []
    return "+".join(stages) or "dense"


def bits_of(array: np.ndarray) -> np.ndarray:
    """float32 array as its bit patterns, so -0.0 != 0.0 and NaN == NaN (bitwise)."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def wire_round_trip(tensor: Any, max_elements: int = 1 << 20) -> Any:
    """encode_encoded -> msgpack bytes -> decode_encoded, as the aggregator sees it."""
    packed = msgpack.packb(encode_encoded(tensor), use_bin_type=True)
    return decode_encoded(
        msgpack.unpackb(packed, raw=False, strict_map_key=True),
        "delta.t",
        max_elements=max_elements,
    )


# =========================================================================== SPEC


@PROPERTY
@given(
    top=st.sampled_from([None, *FRACTIONS]),
    values=st.sampled_from(VALUE_CODINGS),
    ef=st.booleans(),
    packed=st.booleans(),
    flat=st.booleans(),
    order=st.randoms(use_true_random=False),
)
def test_every_spec_parses_in_any_order_and_prints_canonically(
    top, values, ef, packed, flat, order
):
    flat = flat and top is not None
    stages = [f"topk:{FRACTIONS[top]}"] if top is not None else []
    stages += [values] if values else []
    stages += ["ef"] if ef else []
    stages += ["flat"] if flat else []
    stages += ["zlib"] if packed else []
    order.shuffle(stages)
    text = "+".join(stages) or "dense"

    pipeline = parse_spec(text)

    assert pipeline == Pipeline(
        top_k=top, values=values, error_feedback=ef, framing=Framing(flat, packed)
    )
    assert str(pipeline) == canonical(top, values, ef, packed, flat)
    assert parse_spec(str(pipeline)) == pipeline


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("dense", "dense"),
        ("topk:0.10", "topk:0.1"),
        ("topk:.5", "topk:0.5"),
        ("topk:1.0", "topk:1"),
        ("topk:1", "topk:1"),
        ("topk:0.0001", "topk:0.0001"),
        ("zlib+int4+topk:0.25+ef", "topk:0.25+int4+ef+zlib"),
        ("ef+fp16", "fp16+ef"),
        ("zlib", "zlib"),
        ("topk:.5+fp16:", "topk:0.5+fp16"),
        ("topk:1e-2+int8", "topk:0.01+int8"),
        ("zlib+ef+int4+topk:0.020", "topk:0.02+int4+ef+zlib"),
        ("zlib+ef+sign+topk:0.035", "topk:0.035+sign+ef+zlib"),
        ("flat+ef+sign+gtopk:0.0350", "gtopk:0.035+sign+ef+flat"),
        ("gtopk:1e-2+int4+ef", "gtopk:0.01+int4+ef"),
        ("gtopk:1.0", "gtopk:1"),
    ],
)
def test_spec_spellings_print_as_the_canonical_spec(text, spec):
    assert str(parse_spec(text)) == spec
    assert parse_spec(spec) == parse_spec(text)


@PROPERTY
@given(thousandths=st.integers(1, 10_000))
def test_topk_fractions_with_four_decimals_round_trip(thousandths):
    fraction = thousandths / 10_000
    pipeline = parse_spec(f"topk:{fraction!r}+int8")
    assert pipeline.top_k == fraction
    assert parse_spec(str(pipeline)) == pipeline


@PROPERTY
@given(fraction=st.floats(1e-5, 1.0) | st.sampled_from([1e-5, 5e-5, 0.0123456789, 0.99999999]))
def test_the_canonical_spec_of_any_accepted_fraction_is_stable_and_travels(fraction):
    """Whatever the aggregator accepts it announces in canonical form: a fixed point of
    parse/str, within the wire alphabet [a-z0-9:.+], readable by every node."""
    spec = str(parse_spec(f"topk:{fraction!r}+int8+ef"))
    assert spec.endswith("+int8+ef")
    again = parse_spec(spec)
    assert str(again) == spec
    assert again.top_k is not None and 0 < again.top_k <= 1
    params = {"w": np.zeros(3, np.float32)}
    plan = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0, compression=spec)
    message = GlobalModel(
        federation="f", round=1, model="m", model_id=model_id_of(params), params=params, plan=plan
    )
    assert decode_global(encode(message)).plan.compression == spec


def test_a_spec_sparse_map_packs_to_the_documented_bytes():
    """docs/PROTOCOL.md 12.7: the worked example, byte for byte."""
    sent = Sparse(
        shape=(2, 3),
        indices=np.array([1, 4], np.int64),
        values=Quantized(
            shape=(2,), bits=8, chunk=256, scales=np.array([0.25], np.float32),
            codes=np.array([4, -127], np.int8),
        ),
    )  # fmt: skip
    packed = msgpack.packb(encode_encoded(sent), use_bin_type=True)
    assert packed.hex(" ") == (
        "88 a3 65 6e 63 a6 73 70 61 72 73 65 a5 73 68 61 70 65 92 02 03 a5 63 6f 75 6e 74 02 "
        "a5 69 6e 64 65 78 c4 02 01 03 a4 62 69 74 73 08 a5 63 68 75 6e 6b cd 01 00 a6 73 63 "
        "61 6c 65 73 c4 04 00 00 80 3e a4 64 61 74 61 c4 02 84 01"
    )
    assert to_dense(wire_round_trip(sent)).tolist() == [[0, 1.0, 0], [0, -31.75, 0]]
    x = np.array([[0, 1.0, 0], [0, -31.75, 0]], np.float32)
    encoded, _ = parse_spec("topk:0.3+int8").compress({"x": x}, np.random.default_rng(0), None)
    assert msgpack.packb(encode_encoded(encoded["x"]), use_bin_type=True) == packed
    dense_values = Sparse(shape=(2, 3), indices=sent.indices, values=x.reshape(-1)[[1, 4]])
    wire = msgpack.packb(encode_encoded(dense_values), use_bin_type=True)
    assert wire[0] == 0x86 and wire.endswith(bytes.fromhex("c4 08 00 00 80 3f 00 00 fe c1"))


def test_a_sign_sparse_map_packs_to_the_documented_bytes():
    """docs/PROTOCOL.md 12.7, the second example: one-bit values."""
    x = np.zeros((4, 3), np.float32)
    x.reshape(-1)[[0, 11]] = [0.25, -0.125]  # mean magnitude 0.1875
    encoded, _ = parse_spec("topk:0.1+sign").compress({"x": x}, np.random.default_rng(0), None)
    packed = msgpack.packb(encode_encoded(encoded["x"]), use_bin_type=True)
    assert packed.hex(" ") == (
        "88 a3 65 6e 63 a6 73 70 61 72 73 65 a5 73 68 61 70 65 92 04 03 a5 63 6f 75 6e 74 02 "
        "a5 69 6e 64 65 78 c4 02 00 0b a4 62 69 74 73 01 a5 63 68 75 6e 6b cd 01 00 a6 73 63 "
        "61 6c 65 73 c4 04 00 00 40 3e a4 64 61 74 61 c4 01 01"
    )
    assert to_dense(wire_round_trip(encoded["x"])).reshape(-1)[[0, 11]].tolist() == [
        0.1875, -0.1875,
    ]  # fmt: skip
    assert packed.hex(" ") in " ".join(section_12_7_hex())


def section_12_7_hex() -> list[str]:
    """The hex lines of docs/PROTOCOL.md 12.7's code blocks, joined per block."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = text[text.index("### 12.7") : text.index("### 12.8")]
    blocks = section.split("```")[1::2]
    return [" ".join(block.split()) for block in blocks]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("int2", "unknown stage 'int2'"),
        ("gzip", "unknown stage 'gzip'"),
        ("TOPK:0.1", "unknown stage 'TOPK:0.1'"),
        ("dense+zlib", "unknown stage 'dense'"),
        ("int8:3", "unknown stage 'int8:3'"),
        ("ef:1", "unknown stage 'ef:1'"),
        ("topk", "topk needs a fraction"),
        ("topk:", "topk needs a fraction"),
        ("topk:0", "topk needs a fraction"),
        ("topk:-0.1", "topk needs a fraction"),
        ("topk:1.5", "topk needs a fraction"),
        ("topk:abc", "topk needs a fraction"),
        ("topk:0.5:1", "topk needs a fraction"),
        ("topk:nan", "topk needs a fraction"),
        ("topk:inf", "topk needs a fraction"),
        ("int8+fp16", "choose one of fp16, int8, int4, sign"),
        ("topk:0.1+fp16+int4", "choose one of fp16, int8, int4, sign"),
        ("sign+int4", "choose one of fp16, int8, int4, sign"),
        ("sign:1", "unknown stage 'sign:1'"),
        ("ef+ef", "stage 'ef' appears twice"),
        ("int8+flat", "flat encodes a sparse delta, it needs topk:F"),
        ("flat", "flat encodes a sparse delta, it needs topk:F"),
        ("topk:0.1+flat+flat", "stage 'flat' appears twice"),
        ("topk:0.1+flat:1", "unknown stage 'flat:1'"),
        ("zlib+int8+zlib", "stage 'zlib' appears twice"),
        ("int8+int8", "stage 'int8' appears twice"),
        ("topk:0.1+topk:0.2", "stage 'topk' appears twice"),
        ("", "unknown stage ''"),
        ("int8+", "unknown stage ''"),
        ("+int8", "unknown stage ''"),
        ("int8++ef", "unknown stage ''"),
        ("gtopk", "gtopk needs a fraction"),
        ("gtopk:0", "gtopk needs a fraction"),
        ("gtopk:1.5+sign", "gtopk needs a fraction"),
        ("topk:0.1+gtopk:0.1", "choose one of topk, gtopk"),
        ("gtopk:0.1+topk:0.1+flat", "choose one of topk, gtopk"),
        ("gtopk:0.1+gtopk:0.2", "stage 'gtopk' appears twice"),
        ("GTOPK:0.1", "unknown stage 'GTOPK:0.1'"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(text, problem):
    with pytest.raises(ValueError) as info:
        parse_spec(text)
    assert problem in str(info.value)
    assert repr(text) in str(info.value)


# =========================================================================== round trips

FINITE32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
TINY_SHAPES = st.integers(1, 10).flatmap(
    lambda n: st.sampled_from([(n,), (1, n), (n, 1)] + ([(2, n // 2)] if n % 2 == 0 else []))
)


@st.composite
def deltas(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """One tiny tensor (1..10 elements, any float32 in range, ties and zeros likely) and a
    larger one (several quantization chunks) of random normals, some zeroed."""
    tiny = draw(hnp.arrays(np.float32, TINY_SHAPES, elements=FINITE32))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from([(17, 40), (300,), (3, 5, 70)]))
    large = rng.normal(0.0, draw(st.sampled_from([1e-3, 0.1, 10.0])), shape).astype(np.float32)
    if draw(st.booleans()):  # a whole chunk of zeros: scale 0
        large.reshape(-1)[: 256 + 7] = 0
    return {"tiny": tiny, "large": large}


def check_error_bound(pipeline: Pipeline, x: np.ndarray, sent: Any) -> None:
    """``sent`` is what ``pipeline`` may make of ``x`` (before any wire)."""
    flat = x.reshape(-1)
    values = sent
    kept = flat
    if pipeline.top_k is not None:
        assert isinstance(sent, Sparse)
        k = min(flat.size, max(1, math.ceil(pipeline.top_k * flat.size)))
        assert sent.indices.size == k
        assert (np.diff(sent.indices) > 0).all()
        others = np.delete(np.abs(flat), sent.indices)
        if others.size:
            assert np.abs(flat[sent.indices]).min() >= others.max()
        values = sent.values
        kept = flat[sent.indices]
        dense = to_dense(sent).reshape(-1)
        assert not np.delete(dense, sent.indices).any()  # zeros elsewhere
    else:
        assert not isinstance(sent, Sparse)
    if pipeline.values is None:
        assert isinstance(values, np.ndarray)
        # exact (as numbers: with ef, -0.0 + a zero residual is sent as +0.0)
        assert np.array_equal(values.reshape(-1), kept)
    elif pipeline.values == "fp16":
        assert isinstance(values, np.ndarray) and values.dtype == np.float16
        got = values.reshape(-1).astype(np.float32)
        assert np.array_equal(got, kept.astype(np.float16).astype(np.float32))
        assert (np.abs(got - kept) <= np.maximum(np.abs(kept) * 2.0**-11, 2.0**-25)).all()
    elif pipeline.values == "sign":
        assert isinstance(values, Quantized) and values.bits == 1
        assert values.size == kept.size
        assert np.array_equal(values.codes, np.where(kept >= 0, 1, -1))
        means = [
            np.abs(kept[i : i + values.chunk]).mean(dtype=np.float64)
            for i in range(0, kept.size, values.chunk)
        ]
        np.testing.assert_allclose(values.scales, means, rtol=1e-5, atol=0)
    else:
        bits = int(pipeline.values[3])
        limit = 2 ** (bits - 1) - 1
        assert isinstance(values, Quantized) and values.bits == bits
        assert values.size == kept.size
        assert (np.abs(values.codes.astype(np.int16)) <= limit).all()
        chunk_of = np.arange(kept.size) // values.chunk
        expected_scales = [
            np.abs(kept[i : i + values.chunk]).max() / limit
            for i in range(0, kept.size, values.chunk)
        ]
        np.testing.assert_allclose(values.scales, expected_scales, rtol=1e-6, atol=0)
        error = np.abs(kept.astype(np.float64) - values.dequantize().astype(np.float64))
        scale = values.scales[chunk_of].astype(np.float64)
        assert ((error < scale) | (error == 0)).all(), (error - scale).max()


@PROPERTY
@given(pipeline=st.sampled_from(ALL_PIPELINES), delta=deltas(), seed=st.integers(0, 2**16))
def test_every_pipeline_survives_the_wire_bit_for_bit(pipeline, delta, seed):
    layout = {name: x.shape for name, x in delta.items()}
    state = error_feedback_init(layout)
    encoded, new_state = pipeline.compress(delta, np.random.default_rng(seed), state)

    assert (new_state is not None) == pipeline.error_feedback
    for name, x in delta.items():
        sent = encoded[name]
        assert tuple(sent.shape) == x.shape
        assert pipeline.form_problem(sent) is None
        check_error_bound(pipeline, x, sent)
        # one tensor alone through encode_encoded -> msgpack -> decode_encoded
        decoded = wire_round_trip(sent)
        assert type(decoded) is type(sent)
        assert pipeline.form_problem(decoded) is None
        assert np.array_equal(bits_of(to_dense(decoded)), bits_of(to_dense(sent)))

    # and the whole update through encode / decode_update (zlib over the map with +zlib)
    update = NodeUpdate(
        federation="fed", node_id="pi-1", round=3, base_model_id="0" * 32, num_examples=7,
        train_loss=0.5, train_seconds=0.25, delta=encoded, compression=str(pipeline),
    )  # fmt: skip
    payload = encode(update)
    raw_delta = msgpack.unpackb(payload, raw=False)["delta"]
    assert isinstance(raw_delta, bytes if pipeline.framing.zlib else dict)
    decoded_update = decode_update(payload, layout=layout)
    assert decoded_update.compression == str(pipeline)
    assert list(decoded_update.delta) == list(delta)
    for name in delta:
        got = decoded_update.delta[name]
        assert pipeline.form_problem(got) is None
        assert np.array_equal(bits_of(to_dense(got)), bits_of(to_dense(encoded[name])))


def test_gtopk_parses_to_a_pooled_top_k_and_otherwise_the_same_pipeline():
    pooled = parse_spec("gtopk:0.035+sign+ef+flat")
    per_tensor = parse_spec("topk:0.035+sign+ef+flat")
    assert pooled.pooled and not per_tensor.pooled
    assert pooled == Pipeline(
        top_k=0.035, pooled=True, values="sign", error_feedback=True, framing=Framing(flat=True)
    )
    assert str(pooled) == "gtopk:0.035+sign+ef+flat" and parse_spec(str(pooled)) == pooled
    assert Framing.named_by(str(pooled)) == pooled.framing
    assert not parse_spec("sign+ef").pooled


def pooled_deltas() -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Three tensors of different scales (so one may get none of the k), ties and zeros
    likely in the tiny one."""

    def build(args: tuple[np.ndarray, int, float]) -> dict[str, np.ndarray]:
        tiny, seed, scale = args
        rng = np.random.default_rng(seed)
        return {
            "tiny": tiny,
            "w": rng.normal(0.0, scale, (17, 40)).astype(np.float32),
            "b": rng.normal(0.0, 1.0, (30,)).astype(np.float32),
            "s": np.asarray(rng.normal(), np.float32),  # a 0-d tensor stays 0-d
        }

    return st.tuples(
        hnp.arrays(np.float32, TINY_SHAPES, elements=FINITE32),
        st.integers(0, 2**32 - 1),
        st.sampled_from([1e-3, 1.0, 100.0]),
    ).map(build)


@PROPERTY
@given(
    delta=pooled_deltas(),
    fraction=st.sampled_from([1e-6, 0.01, 0.035, 0.5, 1.0]),
    values=st.sampled_from(VALUE_CODINGS),
    flat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gtopk_keeps_the_largest_magnitudes_of_the_whole_delta(delta, fraction, values, flat, seed):
    """k = ceil(F * N) over all N elements: every magnitude kept is at least every one
    left, whichever tensor each is in; positions increase in each tensor, a tensor may
    keep none, and the forms pass the aggregator's check and the wire bit for bit."""
    total = sum(x.size for x in delta.values())
    k = min(total, max(1, math.ceil(fraction * total)))
    pipeline = Pipeline(
        top_k=fraction, pooled=True, values=values, error_feedback=True, framing=Framing(flat=flat)
    )
    assert parse_spec(str(pipeline)) == pipeline
    layout = {name: x.shape for name, x in delta.items()}
    encoded, state = pipeline.compress(
        delta, np.random.default_rng(seed), error_feedback_init(layout)
    )

    assert sum(sent.indices.size for sent in encoded.values()) == k
    kept, left = [], []
    for name, x in delta.items():
        sent = encoded[name]
        assert isinstance(sent, Sparse) and tuple(sent.shape) == x.shape
        assert (np.diff(sent.indices) > 0).all()
        assert pipeline.form_problem(sent) is None
        magnitudes = np.abs(x.reshape(-1))
        kept.append(magnitudes[sent.indices])
        left.append(np.delete(magnitudes, sent.indices))
        if values is None:
            assert np.array_equal(sent.values, x.reshape(-1)[sent.indices])
        # with ef: what was not sent stays in the residual, per tensor
        assert np.array_equal(state.residual[name], x - to_dense(sent))
    kept_all, left_all = np.concatenate(kept), np.concatenate(left)
    if left_all.size:
        assert kept_all.min() >= left_all.max()
    update = NodeUpdate(
        federation="fed", node_id="pi-1", round=3, base_model_id="0" * 32, num_examples=7,
        train_loss=0.5, train_seconds=0.25, delta=encoded, compression=str(pipeline),
    )  # fmt: skip
    decoded = decode_update(encode(update), layout=layout)
    for name in delta:
        assert pipeline.form_problem(decoded.delta[name]) is None
        assert np.array_equal(
            bits_of(to_dense(decoded.delta[name])), bits_of(to_dense(encoded[name]))
        )


def test_gtopk_gives_the_budget_to_the_tensor_where_the_delta_is_large():
    delta = {"big": np.full(100, 5.0, np.float32), "small": np.full(900, 0.1, np.float32)}
    delta["small"][7] = -9.0
    per_tensor, _ = compress_tree(top_k(0.1), delta, np.random.default_rng(0))
    pooled, _ = compress_tree(top_k_pooled(0.1), delta, np.random.default_rng(0))
    assert [per_tensor[n].indices.size for n in delta] == [10, 90]
    assert [pooled[n].indices.size for n in delta] == [99, 1]
    assert pooled["small"].indices.tolist() == [7]
    with pytest.raises(TypeError):
        compress_tree(chain(top_k(0.5), top_k_pooled(0.5)), delta, np.random.default_rng(0))


def test_compression_makes_the_update_smaller():
    rng = np.random.default_rng(0)
    delta = {name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in LAYOUT.items()}

    def size(spec: str) -> int:
        pipeline = parse_spec(spec)
        state = error_feedback_init(LAYOUT)
        encoded, _ = pipeline.compress(delta, np.random.default_rng(1), state)
        return len(encode(make_update(encoded, spec)))

    dense = size("dense")
    assert size("fp16") < 0.55 * dense
    assert size("int8") < 0.3 * dense
    assert size("int4") < 0.18 * dense
    assert size("topk:0.1+int8+ef") < 0.11 * dense
    assert size("topk:0.1+int8+ef+zlib") <= size("topk:0.1+int8+ef") + 16


@PROPERTY
@given(gaps=st.lists(st.integers(0, 2**35 - 1), max_size=40))
def test_varints_round_trip_any_value_below_2_to_35(gaps):
    data = encode_varints(np.array(gaps, dtype=np.uint64))
    assert decode_varints(data, len(gaps), "index").tolist() == gaps
    for value, length in ((0, 1), (127, 1), (128, 2), (2**14, 3), (2**35 - 1, 5)):
        assert len(encode_varints(np.array([value], dtype=np.uint64))) == length


@PROPERTY
@given(
    gaps=st.lists(st.integers(0, 2**14 - 1) | st.integers(0, 127), min_size=1, max_size=60),
    longer=st.booleans(),
)
def test_varints_of_one_and_two_bytes_decode_like_the_general_path(gaps, longer):
    # gaps below 2**14 take the two-byte path; one longer gap sends all to the general one
    values = [*gaps, 2**20] if longer else gaps
    data = encode_varints(np.array(values, dtype=np.uint64))
    assert decode_varints(data, len(values), "index").tolist() == values


@pytest.mark.parametrize(
    "data, count, words",
    [
        (b"\x81\x00", 1, None),  # overlong 1: accepted, fits in 5 bytes
        (b"\x80\x80\x00", 1, None),  # overlong 0 in three bytes
        (b"\x05\x81\x00\x80\x01", 3, None),  # 5, 1, 128
        (b"\x05\x81", 2, "exactly 2"),  # cut inside the last varint
        (b"\x81\x80\x80\x80\x80\x00", 1, "longer than 5"),
        (b"\x05\x06", 1, "exactly 1"),
        (b"\x85", 1, "exactly 1"),
        (b"\x00\x85\x01", 1, "exactly 1"),
        (b"\x80", 0, "exactly 0"),
    ],
)
def test_varint_decoding_checks_every_boundary(data, count, words):
    if words is None:
        expected = {b"\x81\x00": [1], b"\x80\x80\x00": [0]}.get(data, [5, 1, 128])
        assert decode_varints(data, count, "index").tolist() == expected
    else:
        with pytest.raises(SchemaError, match=words):
            decode_varints(data, count, "index")


def test_varint_of_2_to_35_cannot_be_written():
    with pytest.raises(ValueError):
        encode_varints(np.array([2**35], dtype=np.uint64))


# =========================================================================== stochastic rounding


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    x = np.random.default_rng(5).normal(0, 1, 64).astype(np.float32)
    draws = 4000
    # 4000 copies of x, one chunk each: same scale, independent rounding noise
    q = quantize_values(np.tile(x, draws), bits, x.size, np.random.default_rng(6))
    assert np.all(q.scales == q.scales[0])
    scale = float(q.scales[0])
    samples = q.dequantize().reshape(draws, x.size).astype(np.float64)
    mean = samples.mean(axis=0)
    # per-element std of one draw <= scale/2, so of the mean <= scale/(2*sqrt(draws))
    assert np.abs(mean - x).max() < 5 * scale / (2 * math.sqrt(draws))
    # ... whereas rounding to nearest would be biased by up to scale/2 on some elements
    assert np.abs(np.round(x / scale) * scale - x).max() > 20 * scale / (2 * math.sqrt(draws))
    # and every draw is one of the two neighbouring grid points
    assert (np.abs(samples - x) < scale).all()


@pytest.mark.parametrize("spec", ["int8", "int4", "topk:0.3+int8+ef"])
def test_stochastic_rounding_replays_for_a_seed_and_differs_across_seeds(spec):
    x = {"w": np.random.default_rng(1).normal(0, 1, (20, 30)).astype(np.float32)}
    pipeline = parse_spec(spec)
    state = error_feedback_init({"w": (20, 30)})

    def codes(seed: int) -> np.ndarray:
        encoded, _ = pipeline.compress(x, np.random.default_rng(seed), state)
        sent = encoded["w"]
        values = sent.values if isinstance(sent, Sparse) else sent
        assert isinstance(values, Quantized)
        return values.codes

    assert np.array_equal(codes(11), codes(11))
    assert not np.array_equal(codes(11), codes(12))
    seeded = np.random.default_rng([0, 1, 2, 1])  # as a node seeds it
    again = np.random.default_rng([0, 1, 2, 1])
    a, _ = pipeline.compress(x, seeded, state)
    b, _ = pipeline.compress(x, again, state)
    assert np.array_equal(bits_of(to_dense(a["w"])), bits_of(to_dense(b["w"])))


# =========================================================================== error feedback


@pytest.mark.parametrize(
    "spec", ["topk:0.1+int8+ef", "int4+ef", "topk:0.05+fp16+ef", "topk:0.2+ef"]
)
def test_error_feedback_conserves_mass_round_after_round(spec):
    pipeline = parse_spec(spec)
    layout = {"w": (32, 40), "b": (7,)}
    rng = np.random.default_rng(3)
    state = error_feedback_init(layout)
    assert all(not r.any() for r in state.residual.values())
    total_delta = {name: np.zeros(shape, np.float64) for name, shape in layout.items()}
    total_sent = {name: np.zeros(shape, np.float64) for name, shape in layout.items()}
    for round in range(6):
        delta = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in layout.items()}
        encoded, new = pipeline.compress(delta, np.random.default_rng(round), state)
        assert isinstance(new, ErrorFeedbackState)
        for name in layout:
            sent = to_dense(encoded[name])
            np.testing.assert_allclose(
                sent + new.residual[name], delta[name] + state.residual[name], rtol=1e-6, atol=1e-9
            )
            assert new.residual[name].dtype == np.float32
            total_delta[name] += delta[name]
            total_sent[name] += sent
        state = new
    # telescoping: everything computed was sent, or is still waiting in the residual
    for name in layout:
        assert np.abs(state.residual[name]).max() > 0  # lossy: something is left
        np.testing.assert_allclose(
            total_sent[name] + state.residual[name], total_delta[name], rtol=1e-5, atol=1e-7
        )


def test_error_feedback_sends_what_an_earlier_round_held_back():
    pipeline = parse_spec("topk:0.1+ef")
    delta = {"w": np.zeros(10, np.float32)}
    state = ErrorFeedbackState({"w": np.arange(10, dtype=np.float32)})
    encoded, new = pipeline.compress(delta, np.random.default_rng(0), state)
    assert to_dense(encoded["w"]).tolist() == [0] * 9 + [9]
    assert new is not None and new.residual["w"].tolist() == [*range(9), 0]


def test_without_ef_the_state_is_ignored():
    pipeline = parse_spec("topk:0.1")
    delta = {"w": np.zeros(10, np.float32)}
    state = ErrorFeedbackState({"w": np.arange(10, dtype=np.float32)})
    encoded, new = pipeline.compress(delta, np.random.default_rng(0), state)
    assert new is None
    assert not to_dense(encoded["w"]).any()
    # compress_tree itself uses whatever state it is given
    _, kept = compress_tree(pipeline.transform, delta, np.random.default_rng(0), state)
    assert kept is not None and kept.residual["w"].sum() == 45 - 9


@pytest.mark.parametrize(
    "spec", ["dense", "fp16", "int4", "topk:0.1+int8+ef", "topk:0.2+sign+ef+flat", "topk:0.3+ef"]
)
def test_a_pipeline_is_one_stage_of_init_and_update(spec):
    """optax's shape: ``init(shapes) -> state``, ``update(delta, state, rng)``; with ef
    the state is the residual (and the lossy stages' own), carried round to round."""
    layout = {"a": (300,), "b": (4, 5), "c": ()}
    pipeline = parse_spec(spec)
    stage = pipeline.stage
    state = stage.init(layout)
    if pipeline.error_feedback:
        assert isinstance(state, ErrorFeedbackState)
        assert all(not r.any() and r.shape == layout[n] for n, r in state.residual.items())
        assert state.inner == tuple(EmptyState() for _ in state.inner)  # stateless stages
    reference = error_feedback_init(layout) if pipeline.error_feedback else None
    for round_seed in range(3):
        rng = np.random.default_rng(round_seed)
        delta = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout.items()}
        sent, state = stage.update(delta, state, np.random.default_rng([round_seed, 7]))
        expected, reference = pipeline.compress(
            delta, np.random.default_rng([round_seed, 7]), reference
        )
        assert list(sent) == list(expected)
        for name in sent:  # bitwise the same forms
            assert encode_encoded(sent[name]) == encode_encoded(expected[name])
        if pipeline.error_feedback:
            assert reference is not None
            for name in layout:
                assert state.residual[name].tobytes() == reference.residual[name].tobytes()
        # a node restarted from its residual file alone (no inner state) goes on the same
        if pipeline.error_feedback:
            state = ErrorFeedbackState(dict(state.residual))


def test_chain_keeps_each_stage_state_and_order():
    def counting(label):
        def init(_shapes):
            return 0

        def update(delta, count, _rng):
            return {n: np.asarray(t) + label for n, t in delta.items()}, count + 1

        return Stage(init, update)

    stage = chain(counting(1.0), counting(10.0))
    state = stage.init({"w": (2,)})
    assert state == (0, 0)
    out, state = stage.update({"w": np.zeros(2, np.float32)}, state, np.random.default_rng(0))
    assert state == (1, 1) and out["w"].tolist() == [11.0, 11.0]
    wrapped = error_feedback(chain(top_k(0.5)))
    sent, ef = wrapped.update(
        {"w": np.array([1.0, -3.0], np.float32)}, wrapped.init({"w": (2,)}), None
    )
    assert to_dense(sent["w"]).tolist() == [0.0, -3.0] and ef.residual["w"].tolist() == [1.0, 0.0]


def test_the_pipeline_hands_on_the_framing_the_wire_reads():
    for pipeline in ALL_PIPELINES:
        assert Framing.named_by(str(pipeline)) == pipeline.framing
    assert parse_spec("zlib+ef+sign+topk:0.035+flat").framing == Framing(flat=True, zlib=True)
    assert parse_spec("topk:0.1+int8").framing == Framing()


# =========================================================================== aggregation


@PROPERTY
@given(
    pipelines=st.lists(st.sampled_from(ALL_PIPELINES), min_size=1, max_size=3),
    delta=deltas(),
    weights=st.lists(st.integers(1, 2**24), min_size=3, max_size=3),
)
def test_weighted_sum_of_any_form_equals_the_dense_reference(pipelines, delta, weights):
    layout = {name: x.shape for name, x in delta.items()}
    total = WeightedSum(layout)
    exact = {name: np.zeros(shape, np.float64) for name, shape in layout.items()}
    reference = {name: np.zeros(shape, np.float64) for name, shape in layout.items()}
    for i, (pipeline, weight) in enumerate(zip(pipelines, weights, strict=False)):
        encoded, _ = pipeline.compress(delta, np.random.default_rng(i), error_feedback_init(layout))
        decoded = {name: wire_round_trip(tensor) for name, tensor in encoded.items()}
        total.add(decoded, weight)
        for name, tensor in encoded.items():
            dense = to_dense(tensor)
            exact[name] += dense * np.float32(weight)  # one float32 rounding per product
            reference[name] += dense.astype(np.float64) * weight
    assert total.total_weight == sum(weights[: len(pipelines)])
    for name in layout:
        assert np.array_equal(total.sums[name], exact[name])
        scale = np.abs(reference[name]).max()
        np.testing.assert_allclose(
            total.sums[name], reference[name], rtol=2**-23, atol=scale * 2**-23
        )


@pytest.mark.parametrize("chunk", [1, 3, 256, CHUNK + 1, 100_003, 1 << 20])
def test_weighted_sum_of_a_quantized_tensor_larger_than_its_buffer(chunk):
    size = 2 * CHUNK + 4321
    rng = np.random.default_rng(chunk)
    chunks = -(-size // chunk)
    q = Quantized(
        shape=(size,),
        bits=8,
        chunk=chunk,
        scales=rng.uniform(0, 1, chunks).astype(np.float32),
        codes=rng.integers(-127, 128, size).astype(np.int8),
    )
    total = WeightedSum({"w": (size,)})
    total.add({"w": wire_round_trip(q, max_elements=size)}, 3)
    assert np.array_equal(total.sums["w"], (to_dense(q) * np.float32(3)).astype(np.float64))


@PROPERTY
@given(
    size=st.integers(1, 3000),
    chunk=st.integers(1, 700),
    window=st.tuples(st.integers(0, 3000), st.integers(0, 3000)),
    bits=st.sampled_from([8, 4]),
)
def test_dequantizing_any_window_equals_the_per_element_formula(size, chunk, window, bits):
    rng = np.random.default_rng(size * 7 + chunk)
    limit = (1 << (bits - 1)) - 1
    q = Quantized(
        shape=(size,), bits=bits, chunk=chunk,
        scales=rng.uniform(0, 2, -(-size // chunk)).astype(np.float32),
        codes=rng.integers(-limit, limit + 1, size).astype(np.int8),
    )  # fmt: skip
    start, stop = sorted(min(x, size) for x in window)
    reference = q.codes.astype(np.float32) * np.repeat(q.scales, chunk)[:size]
    out = q.dequantize_into(np.full(stop - start, np.nan, np.float32), start)
    assert np.array_equal(bits_of(out), bits_of(reference[start:stop]))
    assert np.array_equal(bits_of(q.dequantize()), bits_of(reference))


def test_float16_table_converts_every_bit_pattern_exactly():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    out = float16_into(every, np.empty(every.size, np.float32))
    assert np.array_equal(bits_of(out), bits_of(every.astype(np.float32)))


@pytest.mark.parametrize(
    "value, problem",
    [(np.inf, "non_finite"), (-np.inf, "non_finite"), (np.nan, "non_finite"),
     (65504.0, None), (-65504.0, None), (-0.0, None), (6e-8, None)],
)  # fmt: skip
def test_float16_values_are_checked_by_their_bits(value, problem):
    values = np.array([0.5, value, -1.0], dtype=np.float16)
    assert value_problem(values) == problem
    assert value_problem(Sparse(shape=(9,), indices=np.array([0, 4, 8]), values=values)) == problem


@pytest.mark.parametrize(
    "scales, ok",
    [([0.0, -0.0, 1.0], True), ([np.float32(MAX_SCALE)], True),
     ([np.nextafter(np.float32(MAX_SCALE), np.float32(np.inf))], False),
     ([-1e-30], False), ([np.nan], False), ([np.inf], False)],
)  # fmt: skip
def test_scales_are_checked_exactly_at_the_edges_of_the_fast_path(scales, ok):
    wire = encode_encoded(
        Quantized(shape=(len(scales),), bits=8, chunk=1,
                  scales=np.array(scales, np.float32), codes=np.ones(len(scales), np.int8))
    )  # fmt: skip
    if ok:
        assert decode_encoded(wire, "delta.t", max_elements=10).scales.size == len(scales)
    else:
        with pytest.raises(SchemaError, match="scales"):
            decode_encoded(wire, "delta.t", max_elements=10)


MODEL = get_model("digits-mlp")
LAYOUT = MODEL.layout
FEDERATION = "comp-fed"
TOPICS = Topics(FEDERATION)


def make_update(delta: dict[str, Any], compression: str, **fields: Any) -> NodeUpdate:
    values: dict[str, Any] = {
        "federation": FEDERATION, "node_id": "pi-0", "round": 1, "base_model_id": "0" * 32,
        "num_examples": 10, "train_loss": 0.5, "train_seconds": 0.1,
        "delta": delta, "compression": compression,
    }  # fmt: skip
    return NodeUpdate(**(values | fields))


class Federation:
    """An Aggregator announcing ``spec``, publishing into a list."""

    def __init__(self, spec: str) -> None:
        plan = TrainingPlan(
            learning_rate=0.1, batch_size=16, local_epochs=1, seed=0, compression=spec
        )
        self.settings = RoundSettings(
            federation=FEDERATION, model_name="digits-mlp", model=MODEL, rounds=2,
            policy=RoundPolicy(expected_nodes=3, min_nodes=3), plan=plan,
            max_update_bytes=dense_update_bound(MODEL),
        )  # fmt: skip
        self.initial = MODEL.init(0)
        self.published: list[tuple[str, bytes, bool]] = []
        self.agg = Aggregator(
            self.settings, self.initial,
            publish=lambda topic, payload, retain: self.published.append((topic, payload, retain)),
            test=None, clock=lambda: 100.0, wall_clock=lambda: 1.7e9,
        )  # fmt: skip
        self.agg.start()

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.published if t == topic]

    def compressed(self, made_with: str, seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        delta = {
            name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in LAYOUT.items()
        }
        encoded, _ = parse_spec(made_with).compress(
            delta, np.random.default_rng(seed + 100), error_feedback_init(LAYOUT)
        )
        return encoded

    def send(self, node: str, delta: dict[str, Any], compression: str, examples: int = 10) -> None:
        update = make_update(
            delta, compression, node_id=node, round=self.agg.round,
            base_model_id=self.agg.model_id, num_examples=examples,
        )  # fmt: skip
        self.agg.handle(TOPICS.update(node), encode(update))


@pytest.mark.parametrize(
    "spec",
    [
        "dense", "fp16+zlib", "int8", "int4+ef", "topk:0.1+int8+ef", "topk:0.05+int4+ef+zlib",
        "topk:0.1+sign+ef+flat", "topk:0.05+int4+ef+flat+zlib", "topk:0.1+fp16+flat",
    ],
)  # fmt: skip
def test_aggregator_averages_updates_made_with_the_announced_spec(spec):
    fed = Federation(spec)
    announced = decode_global(fed.on(TOPICS.global_model)[0])
    assert announced.plan.compression == spec
    updates = []
    for i, examples in enumerate([10, 25, 40]):
        delta = fed.compressed(spec, seed=i)
        fed.send(f"pi-{i}", delta, spec, examples)
        updates.append(({name: to_dense(t) for name, t in delta.items()}, examples))

    [metrics] = [decode_metrics(p) for p in fed.on(TOPICS.metrics)]
    assert metrics.rejected == {}
    assert metrics.participants == ["pi-0", "pi-1", "pi-2"]
    assert metrics.num_examples == 75
    second = decode_global(fed.on(TOPICS.global_model)[1])
    assert second.plan.compression == spec
    expected = fedavg(fed.initial, updates)
    for name in LAYOUT:
        assert np.array_equal(bits_of(second.params[name]), bits_of(expected[name])), name


# (announced SPEC, SPEC the update claims, SPEC its tensors were made with, reason)
REJECTIONS = [
    ("topk:0.1+int8+ef", "topk:0.1+int8", "topk:0.1+int8", "wrong_compression"),
    ("topk:0.1+int8+ef", "topk:0.1+int8+ef+zlib", "topk:0.1+int8+ef", "wrong_compression"),
    ("topk:0.1+int8+ef", "int8+topk:0.1+ef", "topk:0.1+int8+ef", "wrong_compression"),
    ("topk:0.1+int8+ef", "topk:0.2+int8+ef", "topk:0.2+int8+ef", "wrong_compression"),
    ("topk:0.1+int8+ef", "dense", "dense", "wrong_compression"),
    ("topk:0.1+int8+ef", "topk:0.1+int8+ef", "dense", "wrong_encoding"),
    ("topk:0.1+int8+ef", "topk:0.1+int8+ef", "topk:0.1", "wrong_encoding"),
    ("topk:0.1+int8+ef", "topk:0.1+int8+ef", "topk:0.1+fp16", "wrong_encoding"),
    ("topk:0.1+int8+ef", "topk:0.1+int8+ef", "topk:0.1+int4", "wrong_encoding"),
    ("topk:0.1+int8+ef", "topk:0.1+int8+ef", "int8", "wrong_encoding"),
    ("dense", "dense", "topk:0.5", "wrong_encoding"),
    ("dense", "dense", "fp16", "wrong_encoding"),
    ("dense", "dense", "int8", "wrong_encoding"),
    ("fp16", "fp16", "dense", "wrong_encoding"),
    ("int4+zlib", "int4+zlib", "int8", "wrong_encoding"),
    ("int8", "int8", "topk:1+int8", "wrong_encoding"),
    ("topk:0.1+sign+ef", "topk:0.1+sign+ef", "topk:0.1+int4+ef", "wrong_encoding"),
    ("topk:0.1+int4+ef", "topk:0.1+int4+ef", "topk:0.1+sign+ef", "wrong_encoding"),
    # flat changes only the bytes, but the SPEC is compared character for character
    ("topk:0.1+sign+ef+flat", "topk:0.1+sign+ef", "topk:0.1+sign+ef", "wrong_compression"),
    ("topk:0.1+sign+ef", "topk:0.1+sign+ef+flat", "topk:0.1+sign+ef+flat", "wrong_compression"),
    ("topk:0.1+sign+ef+flat", "topk:0.1+sign+ef+flat", "topk:0.1+int4+ef+flat", "wrong_encoding"),
    ("topk:0.1+flat", "topk:0.1+flat", "topk:0.1+fp16+flat", "wrong_encoding"),
]


@pytest.mark.parametrize(("announced", "claimed", "made_with", "reason"), REJECTIONS)
def test_aggregator_rejects_updates_not_made_with_the_announced_spec(
    announced, claimed, made_with, reason
):
    fed = Federation(announced)
    with capture_logs() as logs:
        fed.send("pi-9", fed.compressed(made_with, seed=9), claimed)
    [event] = [e for e in logs if e["event"] == "update.rejected"]
    assert event["reason"] == reason
    if reason == "wrong_encoding":
        assert event["detail"].startswith("delta.l0.w: ")
    else:
        assert repr(claimed) in event["detail"] and repr(announced) in event["detail"]
    assert fed.on(TOPICS.metrics) == []  # the rejected update did not count
    for i in range(3):
        fed.send(f"pi-{i}", fed.compressed(announced, seed=i), announced)
    [metrics] = [decode_metrics(p) for p in fed.on(TOPICS.metrics)]
    assert metrics.rejected == {reason: 1}
    assert metrics.participants == ["pi-0", "pi-1", "pi-2"]


@pytest.mark.parametrize(
    "made_with",
    sorted({made for _, _, made, _ in REJECTIONS} | {"topk:0.1+int8+ef", "topk:0.1+fp16+flat"}),
)
def test_a_whole_delta_is_checked_by_its_first_tensor_as_by_every_tensor(made_with):
    """The intake checks a delta decoded as one run (FlatDense, FlatSparse) by its first
    tensor (``form_sample``): for every announced SPEC, the same answer as the first
    tensor that fails when each is checked, and the same tensor named."""
    fed = Federation("dense")
    update = make_update(
        fed.compressed(made_with, seed=3), made_with, node_id="pi-3", round=1,
        base_model_id=fed.agg.model_id, num_examples=10,
    )  # fmt: skip
    decoded = decode_update(encode(update), layout=LAYOUT)
    # one run: dense float32, quantized sparse (any framing), or the flat framing
    whole = made_with == "dense" or any(s in made_with for s in ("int", "sign", "flat"))
    assert hasattr(decoded.delta, "form_sample") == (whole and made_with.startswith(("d", "t")))
    for announced in sorted({a for a, _, _, _ in REJECTIONS} | {made_with}):
        pipeline = parse_spec(announced)
        each = next(
            (
                ("wrong_encoding", f"delta.{name}: {problem}")
                for name, tensor in decoded.delta.items()
                if (problem := pipeline.form_problem(tensor)) is not None
            ),
            None,
        )
        intake = Intake(
            topics=TOPICS, layout=LAYOUT, max_update_bytes=1 << 20, compression=announced,
            known_nodes=None, policy=fed.settings.policy, hold=dict,  # type: ignore[arg-type]
        )  # fmt: skip
        assert intake._form_problem(replace(decoded, compression=announced)) == each


def huge_update(spec: str, template: dict[str, Any]) -> dict[str, Any]:
    """A valid-looking update whose values are finite but near the float32 limit."""
    delta = dict(template)
    if spec == "dense":
        bias = template["l0.b"].copy()
        bias[0] = 3e38
        delta["l0.b"] = bias
    else:
        q = template["l0.b"]
        delta["l0.b"] = Quantized(
            shape=q.shape, bits=8, chunk=q.chunk, scales=np.full(1, 9e29, np.float32),
            codes=np.full(q.size, 127, np.int8),
        )  # fmt: skip
    return delta


@pytest.mark.parametrize(("spec", "examples"), [("dense", 10), ("int8", 2**24)])
def test_one_huge_update_cannot_make_the_global_model_non_finite(spec, examples):
    """Each accepted value is weighted by num_examples in float32: a value near the float32
    limit (dense 3e38, or int8 code 127 x scale 9e29) must not overflow into an Inf
    global that every node would refuse (the federation would stall)."""
    fed = Federation(spec)
    with np.errstate(over="ignore", invalid="ignore"):
        fed.send("pi-9", huge_update(spec, fed.compressed(spec, seed=9)), spec, examples)
        for i in range(3):
            fed.send(f"pi-{i}", fed.compressed(spec, seed=i), spec)
    assert len(fed.on(TOPICS.metrics)) == 1  # the round closed, with or without pi-9
    newest = decode_global(fed.on(TOPICS.global_model)[-1])  # SchemaError if not finite
    assert newest.round == 2


# =========================================================================== hostile encodings

SHAPE = (4, 5)
POSITIONS = [0, 3, 7, 19]


def sparse_wire(values: str) -> dict[str, Any]:
    """A valid sparse map over SHAPE with values '<f4', '<f2', 'int8', 'int4' or 'sign'."""
    x = np.zeros(20, np.float32)
    x[POSITIONS] = [0.5, -1.0, 0.25, 2.0]
    sent = Sparse(shape=SHAPE, indices=np.array(POSITIONS, np.int64), values=x[POSITIONS])
    if values == "<f2":
        sent = Sparse(shape=SHAPE, indices=sent.indices, values=x[POSITIONS].astype(np.float16))
    elif values.startswith("int"):
        q = quantize_values(x[POSITIONS], int(values[3]), 3, np.random.default_rng(0))
        sent = Sparse(shape=SHAPE, indices=sent.indices, values=q)
    elif values == "sign":
        sent = Sparse(shape=SHAPE, indices=sent.indices, values=sign_values(x[POSITIONS], 3))
    return encode_encoded(sent)


def quant_wire(bits: int, size: int = 11, chunk: int = 4) -> dict[str, Any]:
    x = np.random.default_rng(1).normal(0, 1, size).astype(np.float32)
    if bits == 1:
        return encode_encoded(sign_values(x, chunk))
    return encode_encoded(quantize_values(x, bits, chunk, np.random.default_rng(2)))


def decode(obj: Any) -> Any:
    return decode_encoded(obj, "delta.w", max_elements=100)


def test_the_hostile_samples_start_out_valid():
    for values in ("<f4", "<f2", "int8", "int4", "sign"):
        decoded = decode(sparse_wire(values))
        assert isinstance(decoded, Sparse) and decoded.indices.tolist() == POSITIONS
    for bits in (8, 4, 1):
        assert isinstance(decode(quant_wire(bits)), Quantized)


def changed(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    for key, value in fields.items():
        if value is DELETE:
            del obj[key]
        else:
            obj[key] = value
    return obj


DELETE = object()
VARINT = encode_varints(np.array([0, 3, 4, 12], np.uint64))


HOSTILE = [  # (wire map, reason, words in the error)
    # sparse positions
    (changed(sparse_wire("<f4"), index=encode_varints(np.array([0, 3, 4, 13], np.uint64))), "bad_index", "points past the 20"),
    (changed(sparse_wire("<f4"), index=encode_varints(np.array([20, 0, 0, 0], np.uint64))), "bad_index", "repeats a position"),
    (changed(sparse_wire("<f4"), index=encode_varints(np.array([0, 3, 0, 16], np.uint64))), "bad_index", "repeats a position"),
    (changed(sparse_wire("<f4"), index=encode_varints(np.array([0, 3, 4], np.uint64))), "bad_index", "exactly 4 varints"),
    (changed(sparse_wire("<f4"), index=VARINT + b"\x01"), "bad_index", "exactly 4 varints"),
    (changed(sparse_wire("<f4"), index=VARINT[:-1] + b"\x8c"), "bad_index", "exactly 4 varints"),
    (changed(sparse_wire("<f4"), index=VARINT + b"\x80"), "bad_index", "exactly 4 varints"),  # cut varint after 4 whole ones
    (changed(sparse_wire("<f4"), index=b"\x80", count=0, data=b""), "bad_index", "exactly 0 varints"),
    (changed(sparse_wire("<f4"), index=VARINT[:2] + b"\x83" + VARINT[2:]), "bad_index", "points past the 20"),  # 2-byte gap 515

    (changed(sparse_wire("<f4"), index=b""), "bad_index", "exactly 4 varints"),
    (changed(sparse_wire("<f4"), index=b"\x80\x80\x80\x80\x80\x00" + VARINT[1:]), "bad_index", "longer than 5 bytes"),
    (changed(sparse_wire("<f4"), count=21), "bad_index", "count 21"),
    (changed(sparse_wire("<f4"), count=-1), "bad_index", "count -1"),
    (changed(sparse_wire("<f4"), count=True), "bad_field", "delta.w.count"),
    (changed(sparse_wire("<f4"), count=DELETE), "bad_field", "delta.w.count"),
    (changed(sparse_wire("<f4"), index="abc"), "bad_field", "delta.w.index"),
    # sparse values
    (changed(sparse_wire("<f4"), data=b"\0" * 12), "bad_shape", "needs 16"),
    (changed(sparse_wire("<f2"), data=b"\0" * 10), "bad_shape", "needs 8"),
    (changed(sparse_wire("<f4"), dtype="<f8"), "bad_dtype", "delta.w.dtype"),
    (changed(sparse_wire("int8"), data=b"\x80" * 5), "bad_shape", "needs 4"),
    (changed(sparse_wire("int4"), data=b"\x88" * 3), "bad_shape", "needs 2"),
    (changed(sparse_wire("int8"), scales=b"\0" * 4), "bad_shape", "needs 8"),
    (changed(sparse_wire("int8"), bits=2), "bad_field", "bits is 2"),
    (changed(sparse_wire("sign"), data=b""), "bad_shape", "needs 1"),
    (changed(sparse_wire("sign"), data=b"\x0f\x00"), "bad_shape", "needs 1"),
    (changed(sparse_wire("sign"), scales=b"\0" * 4), "bad_shape", "needs 8"),
    (changed(quant_wire(1), data=b"\xff"), "bad_shape", "needs 2"),
    (changed(quant_wire(1), scales=np.array([1, -1, 1], "<f4").tobytes()), "non_finite", "scales"),
    # quantized
    (changed(quant_wire(8), data=quant_wire(8)["data"][:-1]), "bad_shape", "needs 11"),
    (changed(quant_wire(4), data=quant_wire(4)["data"] + b"\x88"), "bad_shape", "needs 6"),
    (changed(quant_wire(8), scales=quant_wire(8)["scales"][:-4]), "bad_shape", "needs 12"),
    (changed(quant_wire(8), scales=quant_wire(8)["scales"] + b"\0\0\0\0"), "bad_shape", "needs 12"),
    (changed(quant_wire(8), scales=np.array([1, np.nan, 1], "<f4").tobytes()), "non_finite", "scales"),
    (changed(quant_wire(8), scales=np.array([1, np.inf, 1], "<f4").tobytes()), "non_finite", "scales"),
    (changed(quant_wire(8), scales=np.array([1, -0.5, 1], "<f4").tobytes()), "non_finite", "scales"),
    (changed(quant_wire(8), scales=np.array([1, 1e31, 1], "<f4").tobytes()), "non_finite", "scales"),
    (changed(quant_wire(8), bits=16), "bad_field", "bits is 16"),
    (changed(quant_wire(8), bits=4), "bad_shape", "needs 6"),
    (changed(quant_wire(8), bits="8"), "bad_field", "delta.w.bits"),
    (changed(quant_wire(8), chunk=0), "bad_field", "chunk 0"),
    (changed(quant_wire(8), chunk=-4), "bad_field", "chunk -4"),
    (changed(quant_wire(8), chunk=(1 << 20) + 1), "bad_field", "chunk 1048577"),
    (changed(quant_wire(8), data=b"\x00" + quant_wire(8)["data"][1:]), "bad_field", "below -127"),
    (changed(quant_wire(4), data=b"\x80" + quant_wire(4)["data"][1:]), "bad_field", "below -7"),
    (changed(quant_wire(8), shape=[3, -1]), "bad_shape", "delta.w.shape"),
    (changed(quant_wire(8), shape=[1000]), "bad_shape", "has size 1000"),
    (changed(quant_wire(8), shape=[50, 50]), "oversized", "more than 100"),
    (changed(sparse_wire("<f4"), shape=[50, 50]), "oversized", "more than 100"),
    # the form itself
    (changed(quant_wire(8), enc="zstd"), "bad_encoding", "'zstd'"),
    (changed(quant_wire(8), enc=None), "bad_encoding", "None"),
    (["not", "a", "map"], "bad_field", "must be a map"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "reason", "words"), HOSTILE)
def test_hostile_encodings_are_refused_with_a_reason(obj, reason, words):
    with pytest.raises(SchemaError) as info:
        decode(obj)
    assert info.value.reason == reason, str(info.value)
    assert words in str(info.value)


def update_wire(spec: str = "topk:0.1+int8+ef+zlib") -> dict[str, Any]:
    encoded, _ = parse_spec(spec).compress(
        {"w": np.linspace(-1, 1, 20, dtype=np.float32).reshape(SHAPE)},
        np.random.default_rng(0),
        error_feedback_init({"w": SHAPE}),
    )
    return msgpack.unpackb(encode(make_update(encoded, spec)), raw=False)


def decode_wire(obj: dict[str, Any], max_bytes: int = 1 << 20) -> NodeUpdate:
    return decode_update(
        msgpack.packb(obj, use_bin_type=True), layout={"w": SHAPE}, max_bytes=max_bytes
    )


def test_a_zlib_update_decodes():
    obj = update_wire()
    assert isinstance(obj["delta"], bytes)
    assert isinstance(decode_wire(obj).delta["w"], Sparse)


@pytest.mark.parametrize(
    ("delta", "reason", "words"),
    [
        (b"this is not zlib", "malformed", "not zlib"),
        (zlib.compress(b"\xc1"), "malformed", "not msgpack"),
        (zlib.compress(msgpack.packb([1, 2])), "bad_field", "non-empty map"),
        (zlib.compress(msgpack.packb({}))[:-3], "oversized", "or is cut"),
        (zlib.compress(b"\0" * (3 << 20), 9), "oversized", "inflates beyond"),
        ({"w": sparse_wire("int8")}, "bad_field", "zlib bytes"),
        ("text", "bad_field", "zlib bytes"),
        (None, "bad_field", "zlib bytes"),
    ],
)
def test_hostile_zlib_deltas_are_refused_with_a_reason(delta, reason, words):
    obj = update_wire() | {"delta": delta}
    with pytest.raises(SchemaError) as info:
        decode_wire(obj)
    assert info.value.reason == reason, str(info.value)
    assert words in str(info.value)


def test_a_zlib_bomb_is_stopped_at_max_bytes_not_inflated():
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # ~64 KB that would inflate to 64 MiB
    obj = update_wire() | {"delta": bomb}
    with pytest.raises(SchemaError) as info:
        decode_wire(obj, max_bytes=256 * 1024)
    assert info.value.reason == "oversized"
    assert "262144" in str(info.value)


def test_a_zlib_delta_is_only_inflated_with_zlib_in_the_spec():
    obj = update_wire() | {"compression": "topk:0.1+int8+ef"}
    with pytest.raises(SchemaError) as info:
        decode_wire(obj)
    assert info.value.reason == "bad_field"
    assert "non-empty map" in str(info.value)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=24)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
INTS = st.integers(-3, 300) | st.sampled_from([2**31, 2**35, 2**63 - 1, 1 << 20])


@st.composite
def mutated_wires(draw: st.DrawFn) -> dict[str, Any]:
    """A valid sparse or quantized wire map with one to three fields broken."""
    kind = draw(
        st.sampled_from(["<f4", "<f2", "int8", "int4", "sign", "quant8", "quant4", "quant1"])
    )
    obj = quant_wire(int(kind[5])) if kind.startswith("quant") else sparse_wire(kind)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*sorted(obj), "bits", "dtype", "chunk", "scales", "enc"]))
        value = obj.get(key)
        how = draw(st.sampled_from(["replace", "delete", "int", "bytes", "shape"]))
        if how == "delete":
            obj.pop(key, None)
        elif how == "int":
            obj[key] = draw(INTS)
        elif how == "shape":
            obj[key] = draw(st.lists(INTS, max_size=3))
        elif how == "bytes" and isinstance(value, bytes) and value:
            raw = bytearray(value)
            for _ in range(draw(st.integers(1, 4))):
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
            end = draw(st.integers(0, len(raw) + 4))
            obj[key] = bytes(raw[:end]) + bytes(draw(st.binary(max_size=max(0, end - len(raw)))))
        else:
            obj[key] = draw(VALUES)
    return obj


@settings(PROPERTY, max_examples=400)
@given(obj=mutated_wires())
def test_mutated_wire_tensors_decode_cleanly_or_raise_schema_error(obj):
    try:
        tensor = decode_encoded(obj, "delta.w", max_elements=64)
    except SchemaError as error:
        assert error.reason and error.detail.startswith("delta.w")
        return
    # Whatever is accepted can be used as is: densified and summed without surprise.
    dense = to_dense(tensor)
    assert dense.shape == tuple(tensor.shape) and dense.dtype == np.float32
    total = WeightedSum({"w": dense.shape})
    with np.errstate(over="ignore", invalid="ignore"):  # huge values may overflow to inf
        total.add({"w": tensor}, 2)
        doubled = dense * np.float32(2)
    assert np.array_equal(total.sums["w"], doubled.astype(np.float64), equal_nan=True)


@PROPERTY
@given(data=st.data())
def test_mutated_zlib_update_payloads_decode_or_raise_schema_error(data):
    obj = update_wire()
    delta = bytearray(obj["delta"])
    for _ in range(data.draw(st.integers(1, 4))):
        delta[data.draw(st.integers(0, len(delta) - 1))] = data.draw(st.integers(0, 255))
    obj["delta"] = bytes(delta[: data.draw(st.integers(0, len(delta)))])
    try:
        decode_wire(obj)
    except SchemaError as error:
        assert error.reason in {
            "malformed",
            "oversized",
            "bad_field",
            "bad_index",
            "bad_shape",
            "bad_dtype",
            "non_finite",
            "layout_mismatch",
            "bad_encoding",
        }


# =========================================================================== node residual


def saved(round: int = 4, spec: str = "topk:0.1+int8+ef") -> SavedResidual:
    rng = np.random.default_rng(round)
    return SavedResidual(
        round=round,
        spec=spec,
        residual={
            "l0.w": rng.normal(0, 1, (64, 32)).astype(np.float32),
            "l0.b": np.arange(32, dtype=np.float32),
        },
    )


def test_residual_save_load_round_trip(tmp_path):
    path = tmp_path / "residual.npz"
    original = saved()
    residual.save(path, original)
    loaded = residual.load(path)
    assert loaded is not None
    assert (loaded.round, loaded.spec) == (4, "topk:0.1+int8+ef")
    assert list(loaded.residual) == ["l0.w", "l0.b"]
    for name, array in original.residual.items():
        assert loaded.residual[name].dtype == np.float32
        assert np.array_equal(bits_of(loaded.residual[name]), bits_of(array))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual.npz"]  # no temp file left
    residual.save(path, saved(round=5, spec="int4+ef"))  # overwrite
    again = residual.load(path)
    assert again is not None and (again.round, again.spec) == (5, "int4+ef")


LAYOUT_SAVED = {"l0.w": (64, 32), "l0.b": (32,)}


@pytest.mark.parametrize(
    ("round", "spec", "layout", "problem"),
    [
        (5, "topk:0.1+int8+ef", LAYOUT_SAVED, None),
        (5, "topk:0.1+int8+ef", {"l0.b": (32,), "l0.w": (64, 32)}, None),
        (4, "topk:0.1+int8+ef", LAYOUT_SAVED, "made in round 4, this is round 4"),
        (6, "topk:0.1+int8+ef", LAYOUT_SAVED, "made in round 4, this is round 6"),
        (3, "topk:0.1+int8+ef", LAYOUT_SAVED, "made in round 4, this is round 3"),
        (1, "topk:0.1+int8+ef", LAYOUT_SAVED, "made in round 4, this is round 1"),
        (
            5,
            "topk:0.1+int4+ef",
            LAYOUT_SAVED,
            "made for compression 'topk:0.1+int8+ef', now 'topk:0.1+int4+ef'",
        ),
        (5, "topk:0.1+int8+ef", {"l0.w": (64, 32), "l0.b": (31,)}, "another parameter layout"),
        (5, "topk:0.1+int8+ef", {"l0.w": (64, 32)}, "another parameter layout"),
        (5, "topk:0.1+int8+ef", {**LAYOUT_SAVED, "l1.b": (10,)}, "another parameter layout"),
    ],
)
def test_a_residual_is_usable_only_next_round_with_the_same_spec_and_layout(
    round, spec, layout, problem
):
    verdict = saved().usable_for(round, spec, layout)
    if problem is None:
        assert verdict is None
    else:
        assert verdict is not None and problem in verdict


def npz_without_meta(path):
    np.savez(path, t0=np.zeros(3, np.float32))


def npz_with_bad_meta(path):
    np.savez(path, t0=np.zeros(3, np.float32), meta=np.array("{not json"))


def npz_with_missing_tensor(path):
    np.savez(path, meta=np.array('{"round": 1, "spec": "int8+ef", "names": ["a"]}'))


def truncated(path):
    residual.save(path, saved())
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize(
    "spoil",
    [
        lambda path: None,  # no file at all
        lambda path: path.write_bytes(b"hello, not an npz"),
        lambda path: path.write_bytes(b"\x93NUMPY garbage"),
        lambda path: path.write_bytes(b"\x00" * 64),
        npz_without_meta,
        npz_with_bad_meta,
        npz_with_missing_tensor,
        lambda path: path.write_bytes(b""),  # EOFError inside np.load
        truncated,  # zipfile.BadZipFile inside np.load
        lambda path: path.write_bytes(b"PK\x03\x04" + b"\0" * 40),
    ],
)
def test_an_unreadable_residual_loads_as_none(tmp_path, spoil):
    path = tmp_path / "residual.npz"
    spoil(path)
    raised = loaded = None
    with warnings.catch_warnings():
        # np.load leaks the open file when the zip is bad; collect it here, quietly
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            loaded = residual.load(path)
        except Exception as error:
            raised = repr(error)
        gc.collect()
    assert raised is None
    assert loaded is None


def test_all_pipelines_are_distinct_and_named_canonically():
    names = [str(p) for p in ALL_PIPELINES]
    # without topk: 5 value codings x ef x zlib; with each of 3 fractions: also x flat
    assert len(set(names)) == len(ALL_PIPELINES) == 5 * 2 * 2 + 3 * 5 * 2 * 2 * 2
    expected = [
        choice
        for choice in itertools.product(
            (None, *FRACTIONS), VALUE_CODINGS, (False, True), (False, True), (False, True)
        )
        if choice[0] is not None or not choice[3]
    ]
    assert expected == PIPELINE_CHOICES
    for pipeline, (top, values, ef, flat, packed) in zip(ALL_PIPELINES, expected, strict=True):
        assert str(pipeline) == canonical(top, values, ef, packed, flat)
        assert parse_spec(str(pipeline)) == pipeline


def test_fp16_clips_to_its_range_so_nothing_sent_or_kept_is_infinite() -> None:
    from fedmq.compression.transforms import error_feedback_init as _init

    pipeline = parse_spec("fp16+ef")
    delta = {"w": np.array([1e6, -1e6, 0.5], dtype=np.float32)}
    encoded, state = pipeline.compress(delta, np.random.default_rng(0), _init({"w": (3,)}))
    sent = to_dense(encoded["w"])
    assert np.isfinite(sent).all()
    assert sent[0] == np.finfo(np.float16).max and sent[1] == -np.finfo(np.float16).max
    assert state is not None and np.isfinite(state.residual["w"]).all()
    np.testing.assert_allclose(sent + state.residual["w"], delta["w"])


@pytest.mark.parametrize("pipeline", ALL_PIPELINES, ids=str)
def test_a_scalar_parameter_stays_an_array_through_every_pipeline(pipeline):
    """numpy turns arithmetic on 0-d arrays into scalars: fp16 and error feedback used to
    hand a numpy scalar to the next stage ("values are already coded")."""
    delta = {"s": np.asarray(-0.75, np.float32), "w": np.arange(6, dtype=np.float32) / 8}
    layout = {name: x.shape for name, x in delta.items()}
    encoded, state = pipeline.compress(delta, np.random.default_rng(0), error_feedback_init(layout))
    assert to_dense(encoded["s"]).shape == ()
    if state is not None:
        assert isinstance(state.residual["s"], np.ndarray) and state.residual["s"].shape == ()
    got = decode_update(encode(make_update(encoded, str(pipeline))), layout=layout).delta
    assert np.array_equal(to_dense(got["s"]), to_dense(encoded["s"]))
