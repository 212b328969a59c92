"""The flat wire form (schemas.flat) and its Elias-Fano positions (schemas.eliasfano):
round trips for any position set and any split, the size bound, hostile encodings refused
with a reason, and flat updates giving bitwise the tensors and sums of the per-tensor form."""

import zlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.aggregator.fedavg import WeightedSum
from fedmq.compression import parse_spec
from fedmq.compression.transforms import error_feedback_init, quantize_values, sign_values
from fedmq.schemas import SchemaError, decode_update, encode
from fedmq.schemas.eliasfano import (
    MAX_LOW_BITS,
    EliasFano,
    _unpack_fixed,
    best_low_bits,
    decode_positions,
    encode_positions,
)
from fedmq.schemas.encodings import Encoded, Quantized, Sparse, to_dense
from fedmq.schemas.flat import FLAT_LAYOUT_NAME, FlatSparse, decode_flat, encode_flat
from tests.unit.test_batched import PROPERTY
from tests.unit.test_compression import DELETE, VALUES, bits_of, changed, make_update

# The reasons a decoder may give (docs/PROTOCOL.md section 9).
SLUGS = {
    "malformed", "oversized", "bad_field", "bad_encoding", "bad_dtype", "bad_shape",
    "bad_index", "layout_mismatch", "non_finite", "out_of_range",
}  # fmt: skip
MAX_N = 1 << 25  # models are limited to 2**25 elements


def wire(obj: Any) -> Any:
    """Through msgpack and back, as the decoder sees it."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=True)


# =========================================================================== Elias-Fano


@st.composite
def position_sets(draw: st.DrawFn, max_count: int = 4000) -> tuple[np.ndarray, int]:
    """n in 0..2**25 and k of its positions, 0 <= k <= n (k == n while n is small), spread at
    random, packed at the start or the end, evenly strided, or clustered in a window."""
    n = draw(
        st.integers(0, 64) | st.integers(0, 1 << 16) | st.integers(0, MAX_N)
        | st.sampled_from([1, 2, MAX_N])
    )  # fmt: skip
    most = min(n, max_count)
    k = draw(st.integers(0, most) | st.sampled_from([0, 1, most]))
    k = min(k, most)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["random", "start", "end", "strided", "cluster"]))
    if not k:
        positions = np.zeros(0, np.int64)
    elif kind == "start":
        positions = np.arange(k)
    elif kind == "end":
        positions = np.arange(n - k, n)
    elif kind == "strided":  # (i * n) // k rises by at least 1 while k <= n
        positions = np.arange(k, dtype=np.int64) * n // k
    elif kind == "cluster":
        width = draw(st.integers(k, min(n, 4 * k + 1)))
        start = draw(st.integers(0, n - width))
        positions = start + np.sort(rng.choice(width, k, replace=False))
    else:
        positions = np.sort(rng.choice(n, k, replace=False))
    return positions.astype(np.int64), n


def elias_fano_by_hand(positions: list[int], low_bits: int) -> EliasFano:
    """docs/PROTOCOL.md 12.9 in plain Python: the low ``low_bits`` bits of each position one
    after another, least significant bit first; bit (p >> L) + j of ``upper`` for the j-th
    position; bit b is bit b % 8 of byte b // 8."""
    upper = bytearray()
    for j, position in enumerate(positions):
        bit = (position >> low_bits) + j
        upper.extend(bytes(max(0, bit // 8 + 1 - len(upper))))
        upper[bit // 8] |= 1 << (bit % 8)
    mask = (1 << low_bits) - 1
    bits = "".join(f"{p & mask:0{low_bits}b}"[::-1] for p in positions) if low_bits else ""
    bits += "0" * (-len(bits) % 8)  # padding after the last low part
    lower = bytes(int(bits[i : i + 8][::-1], 2) for i in range(0, len(bits), 8))
    return EliasFano(low_bits, bytes(upper), lower)


@PROPERTY
@given(case=position_sets())
def test_elias_fano_round_trips_any_strictly_increasing_positions(case):
    positions, n = case
    code = encode_positions(positions, n)
    got = decode_positions(code, positions.size, n, "delta")
    assert got.dtype == np.int64 and np.array_equal(got, positions)
    assert code.low_bits == best_low_bits(positions, n)
    if positions.size:  # the writer follows the documented layout, bit for bit
        assert code == elias_fano_by_hand(positions.tolist(), code.low_bits)
    if n < 2**31:  # narrower positions code the same
        assert encode_positions(positions.astype(np.int32), n) == code


@PROPERTY
@given(case=position_sets(max_count=1500), data=st.data())
def test_elias_fano_decodes_whatever_low_bits_the_writer_chose(case, data):
    """Decoding does not depend on L: every split from 0 to 40 gives the same positions.
    (L is drawn so that the bitmap stays below 2**20 bits; L = 0 still meets n up to 2**20.)"""
    positions, n = case
    low_bits = data.draw(st.integers(max(0, n.bit_length() - 20), MAX_LOW_BITS))
    code = elias_fano_by_hand(positions.tolist(), low_bits)
    got = decode_positions(code, positions.size, n, "delta")
    assert got.dtype == np.int64 and np.array_equal(got, positions)


@pytest.mark.parametrize(
    ("positions", "n"),
    [
        (np.array([0]), MAX_N),
        (np.array([MAX_N - 1]), MAX_N),
        (np.array([0, MAX_N - 1]), MAX_N),
        (np.array([MAX_N - 2, MAX_N - 1]), MAX_N),
        (np.arange(1 << 20), 1 << 20),  # k == n: L = 0, every position
        (np.arange(0, MAX_N, 4096), MAX_N),
        (np.zeros(0, np.int64), 0),
        (np.zeros(0, np.int64), MAX_N),
    ],
)
def test_elias_fano_round_trips_the_extremes(positions, n):
    code = encode_positions(positions, n)
    assert np.array_equal(decode_positions(code, positions.size, n, "delta"), positions)
    for low_bits in (0, 7, 8, 9, 25, MAX_LOW_BITS):
        if positions.size <= 5000 and n >> low_bits <= 1 << 21:  # plain Python: keep it small
            by_hand = elias_fano_by_hand(positions.tolist(), low_bits)
            assert np.array_equal(decode_positions(by_hand, positions.size, n, "d"), positions)


def test_the_documented_example_codes_to_its_bytes():
    """docs/PROTOCOL.md 12.9: positions 3, 9, 10, 30 of 40 with L = 2."""
    code = elias_fano_by_hand([3, 9, 10, 30], 2)
    assert code == EliasFano(2, bytes.fromhex("19 04"), bytes.fromhex("a7"))
    assert decode_positions(code, 4, 40, "delta").tolist() == [3, 9, 10, 30]


@PROPERTY
@given(width=st.integers(1, 40), count=st.integers(0, 70), data=st.data())
def test_unpack_fixed_reads_fields_like_plain_python(width, count, data):
    raw = data.draw(st.binary(min_size=-(-count * width // 8), max_size=-(-count * width // 8)))
    whole = int.from_bytes(raw, "little")  # padding bits after the last field may be set
    expected = [(whole >> (i * width)) & ((1 << width) - 1) for i in range(count)]
    got = _unpack_fixed(raw, count, width)
    assert got.dtype == np.int64 and got.tolist() == expected


def ceil_log2_ratio(n: int, k: int) -> int:
    """ceil(log2(n / k)) for 1 <= k <= n, in integers."""
    c = 0
    while k << c < n:
        c += 1
    return c


@PROPERTY
@given(case=position_sets())
def test_elias_fano_takes_at_most_2_plus_ceil_log2_n_over_k_bits_per_position(case):
    """Bound: 8 * (len(upper) + len(lower)) <= k * (2 + ceil(log2(n / k))) + 16.

    Why: the writer takes the smallest of its candidates, and L0 = floor(log2(n / k)) is one
    of them. With L0, ``lower`` holds k * L0 bits and ``upper`` (p_last >> L0) + k bits, where
    p_last >> L0 <= (n - 1) >> L0 < n / 2**L0. If n / k is a power of two, L0 = ceil(log2(n/k))
    and n / 2**L0 = k, so upper < 2k bits; otherwise ceil(log2(n/k)) = L0 + 1 and
    n / 2**L0 < 2k, so upper < 3k bits. Either way the bits total at most k * (2 + ceil(...)),
    and rounding each half up to whole bytes adds less than 2 bytes (16 bits)."""
    positions, n = case
    k = positions.size
    code = encode_positions(positions, n)
    used = len(code.upper) + len(code.lower)
    if not k:
        assert used == 0
        return
    assert 8 * used <= k * (2 + ceil_log2_ratio(n, k)) + 16
    # the writer's choice: the fewest bytes of floor(log2(n/k)) - 1 .. + 1, smallest on a tie
    guess = (n // k).bit_length() - 1
    last = int(positions[-1])
    sizes = {
        low: -(-k * low // 8) + -(-((last >> low) + k) // 8)
        for low in range(max(0, guess - 1), guess + 2)
    }
    assert code.low_bits == min(sizes, key=lambda low: (sizes[low], low))
    assert used == sizes[code.low_bits]


# A valid code: positions 3, 17, 18, 60 of 100 with L = 2: upper bits 0, 5, 6, 18 (3 bytes,
# at most ceil((99 >> 2) + 4) / 8) = 4 allowed), lower 3, 1, 2, 0 in one byte.
BASE = elias_fano_by_hand([3, 17, 18, 60], 2)


def with_low(low_bits: Any) -> EliasFano:
    """BASE with any ``low_bits``, typed or not."""
    return EliasFano(low_bits, BASE.upper, BASE.lower)


def test_the_hostile_elias_fano_base_is_valid():
    assert EliasFano(2, bytes.fromhex("61 00 04"), bytes.fromhex("27")) == BASE
    assert decode_positions(BASE, 4, 100, "delta").tolist() == [3, 17, 18, 60]


HOSTILE_EF = [  # (code, count, size, words in the error)
    (BASE._replace(upper=BASE.upper + b"\x01"), 4, 100, "has 5 set bits, count is 4"),
    (BASE._replace(upper=b"\x60\x00\x04"), 4, 100, "has 3 set bits, count is 4"),
    (BASE, 3, 100, "has 4 set bits, count is 3"),
    (BASE._replace(upper=b""), 4, 100, "upper holds 0 bytes, needs 1..4"),
    (EliasFano(0, b"\x01", b""), 0, 100, "upper must be empty when count is 0"),
    (EliasFano(3, b"", b"\x00"), 0, 100, "lower holds 1 bytes, needs 0"),
    (BASE._replace(upper=BASE.upper + b"\x00"), 4, 100, "ending in a set bit"),
    (BASE._replace(upper=BASE.upper + b"\x00\x00\x01"), 4, 100, "holds 6 bytes, needs 1..4"),
    (EliasFano(0, b"\x01", b""), 1, 0, "needs 1..0"),
    (BASE._replace(lower=BASE.lower + b"\x00"), 4, 100, "lower holds 2 bytes, needs 1"),
    (BASE._replace(lower=b""), 4, 100, "lower holds 0 bytes, needs 1"),
    (BASE._replace(low_bits=3), 4, 100, "lower holds 1 bytes, needs 2"),
    (elias_fano_by_hand([3, 3], 2), 2, 100, "repeats a position"),  # same high and low part
    (elias_fano_by_hand([60, 60], 0), 2, 100, "repeats a position"),
    (elias_fano_by_hand([3, 2], 2), 2, 100, "repeats a position"),  # same high, lower low
    (elias_fano_by_hand([3, 99], 2), 2, 98, "points past the 98 elements"),  # 99 >> 2 fits
    (elias_fano_by_hand([100], 0), 1, 100, "points past the 100 elements"),
    (with_low(-1), 4, 100, "low is not an int in 0..40"),
    (with_low(41), 4, 100, "low is not an int in 0..40"),
    (with_low(True), 4, 100, "low is not an int in 0..40"),
    (with_low(2.0), 4, 100, "low is not an int in 0..40"),
    (with_low(None), 4, 100, "low is not an int in 0..40"),
    (with_low(np.int64(2)), 4, 100, "low is not an int in 0..40"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "count", "size", "words"), HOSTILE_EF)
def test_hostile_elias_fano_codes_are_refused_as_bad_index(code, count, size, words):
    with pytest.raises(SchemaError) as info:
        decode_positions(code, count, size, "delta")
    assert info.value.reason == "bad_index", str(info.value)
    assert info.value.detail.startswith("delta")
    assert words in info.value.detail


def test_an_upper_beyond_the_bound_is_refused_before_it_is_unpacked(monkeypatch):
    def unpack(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the bitmap was unpacked")

    monkeypatch.setattr(np, "unpackbits", unpack)
    huge = BASE._replace(upper=b"\x01" * (10 << 20))  # 10 MiB for 100 positions
    with pytest.raises(SchemaError) as info:
        decode_positions(huge, 4, 100, "delta")
    assert info.value.reason == "bad_index"
    assert "holds 10485760 bytes, needs 1..4" in info.value.detail


# =========================================================================== flat deltas

VALUE_KINDS = ("none", "fp16", "int8", "int4", "sign")
SHAPES = st.lists(st.integers(0, 40), min_size=1, max_size=2).map(tuple) | st.sampled_from(
    [(600,), (3, 257), (0, 7)]  # several chunks of 256 kept in one tensor; an empty one
)


def nothing_kept(tensor: Sparse) -> Sparse:
    """The same tensor with no element kept, values of the same kind."""
    values = tensor.values
    if isinstance(values, Quantized):
        values = Quantized(shape=(0,), bits=values.bits, chunk=values.chunk,
                           scales=values.scales[:0], codes=values.codes[:0])  # fmt: skip
    else:
        values = values[:0]
    return Sparse(shape=tensor.shape, indices=tensor.indices[:0], values=values)


@st.composite
def compressed_deltas(
    draw: st.DrawFn,
) -> tuple[dict[str, tuple[int, ...]], str, dict[str, Encoded]]:
    """A layout of one to five tensors (some empty), the real compressor's output for
    ``topk:F+VALUES+ef`` over a random delta, and some tensors with nothing kept."""
    values = draw(st.sampled_from(VALUE_KINDS))
    fraction = draw(st.sampled_from(["0.01", "0.035", "0.2", "0.5", "1"]))
    spec = f"topk:{fraction}" + ("" if values == "none" else f"+{values}") + "+ef"
    layout = {f"t{i}": draw(SHAPES) for i in range(draw(st.integers(1, 5)))}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    delta = {
        name: np.array(rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 3), np.float32)
        for name, shape in layout.items()
    }
    state = error_feedback_init(layout)
    state.residual[next(iter(layout))][...] = rng.standard_normal(next(iter(layout.values())))
    encoded, _ = parse_spec(spec).compress(delta, rng, state)
    for name in draw(st.sets(st.sampled_from(sorted(layout)))):
        encoded[name] = nothing_kept(encoded[name])  # type: ignore[arg-type]
    return layout, spec, encoded


def assert_same_tensor(got: Encoded, want: Encoded) -> None:
    """Bitwise the same sparse tensor: shape, positions, values and their form."""
    assert isinstance(got, Sparse) and isinstance(want, Sparse)
    assert got.shape == want.shape
    assert got.indices.dtype == np.int64 and np.array_equal(got.indices, want.indices)
    if isinstance(want.values, Quantized):
        assert isinstance(got.values, Quantized)
        for field in ("shape", "bits", "chunk"):
            assert getattr(got.values, field) == getattr(want.values, field)
        assert np.array_equal(bits_of(got.values.scales), bits_of(want.values.scales))
        assert np.array_equal(got.values.codes, want.values.codes)
    else:
        assert isinstance(got.values, np.ndarray) and got.values.dtype == want.values.dtype
        width = f"<u{want.values.dtype.itemsize}"
        assert np.array_equal(got.values.view(width), want.values.view(width))
    assert np.array_equal(bits_of(to_dense(got)), bits_of(to_dense(want)))


def offsets_of(layout: dict[str, tuple[int, ...]]) -> dict[str, int]:
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in layout.values()]
    return dict(zip(layout, np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))


@PROPERTY
@given(
    case=compressed_deltas(),
    packed=st.booleans(),
    weights=st.lists(st.integers(1, 2**24), min_size=1, max_size=3),
)
def test_a_flat_update_decodes_to_exactly_the_compressors_tensors_and_sums(case, packed, weights):
    layout, spec, encoded = case
    tail = "+zlib" if packed else ""
    flat_payload = encode(make_update(encoded, f"{spec}+flat{tail}"))
    update = decode_update(flat_payload, layout=layout)
    assert update.compression == f"{spec}+flat{tail}"
    flat = update.delta
    assert isinstance(flat, FlatSparse)
    assert list(flat) == list(layout) and len(flat) == len(layout)
    for name in layout:
        assert name in flat
        assert_same_tensor(flat[name], encoded[name])
    # the whole run: positions laid end to end, values in position order
    offsets = offsets_of(layout)
    tensors = [encoded[name] for name in layout]
    assert all(isinstance(t, Sparse) for t in tensors)
    positions = [t.indices + offsets[name] for name, t in zip(layout, tensors, strict=True)]
    assert np.array_equal(flat.positions, np.concatenate(positions))
    values = np.concatenate([t.values_f32() for t in tensors])
    assert np.array_equal(bits_of(flat.values_f32()), bits_of(values))
    if flat.scales is not None:  # each tensor's scales restart at its first kept element
        chunk = next(t.values.chunk for t in tensors)
        assert flat.scales.size == sum(-(-t.indices.size // chunk) for t in tensors)
    # the aggregator's sum: bitwise that of the per-tensor form and of the compressor's output
    per_tensor = decode_update(encode(make_update(encoded, f"{spec}{tail}")), layout=layout)
    sums = [WeightedSum(layout) for _ in range(3)]
    for weight in weights:
        for total, delta in zip(sums, (flat, per_tensor.delta, encoded), strict=True):
            total.add(delta, weight)
    for name in layout:
        want = sums[2].sums[name].view(np.uint64)
        assert np.array_equal(sums[0].sums[name].view(np.uint64), want)
        assert np.array_equal(sums[1].sums[name].view(np.uint64), want)
    assert sums[0].total_weight == sums[1].total_weight == sum(weights)
    if packed:  # the delta travels as zlib of msgpack of the one flat map
        raw = msgpack.unpackb(flat_payload, raw=False)["delta"]
        assert wire(encode_flat(encoded)) == msgpack.unpackb(zlib.decompress(raw), raw=False)


# --------------------------------------------------------------------------- hostile maps

LAYOUT = {"w": (4, 5), "b": (5,)}
KEPT = {"w": [0, 7, 19], "b": [0, 2, 4]}  # flat positions 0, 7, 19, 20, 22, 24: L = 1


def flat_map(values: str) -> dict[str, Any]:
    """A valid flat map over LAYOUT, three kept elements per tensor, values '<f4', '<f2',
    'int8', 'int4' or 'sign' (chunk 2: each tensor has 2 scales, 4 in all, where one run
    of 6 values would have 3)."""
    x = {"w": np.array([0.5, -1.0, 0.25], np.float32), "b": np.array([2, -0.75, 1.5], np.float32)}
    delta: dict[str, Encoded] = {}
    for name, kept in KEPT.items():
        coded: Any = x[name]
        if values == "<f2":
            coded = x[name].astype(np.float16)
        elif values == "sign":
            coded = sign_values(x[name], 2)
        elif values.startswith("int"):
            coded = quantize_values(x[name], int(values[3]), 2, np.random.default_rng(0))
        delta[name] = Sparse(shape=LAYOUT[name], indices=np.array(kept, np.int64), values=coded)
    return wire(encode_flat(delta))


def decode(obj: Any, layout: Any = LAYOUT, max_elements: int = 100) -> FlatSparse:
    return decode_flat(obj, layout, max_elements=max_elements)


def test_the_hostile_flat_samples_start_out_valid():
    for values in ("<f4", "<f2", "int8", "int4", "sign"):
        obj = flat_map(values)
        assert (obj["size"], obj["count"], obj["low"]) == (25, 6, 1)
        flat = decode(obj)
        assert flat.positions.tolist() == [0, 7, 19, 20, 22, 24]
        assert flat["w"].indices.tolist() == KEPT["w"] and flat["b"].indices.tolist() == KEPT["b"]
        if values in ("<f4", "<f2"):
            assert flat.dense is not None and flat.dense.dtype == np.dtype(values)
        else:
            assert flat.scales is not None and flat.scales.size == 4
            assert len(obj["scales"]) == 16
    sign = decode(flat_map("sign"))
    # per tensor: scales of 0.75, 0.25 (w) then 1.375, 1.5 (b), each over its own chunk
    assert sign.values_f32().tolist() == [0.75, -0.75, 0.25, 1.375, -1.375, 1.5]


TOO_BIG = 10 << 20  # a 10 MiB upper for 25 positions


HOSTILE_FLAT = [  # (flat map, reason, words in the error)
    (["not", "a", "map"], "bad_field", "delta must be a map"),
    (b"flat", "bad_field", "delta must be a map"),
    (None, "bad_field", "delta must be a map"),
    (changed(flat_map("int8"), enc=DELETE), "bad_encoding", "None is not 'flat'"),
    (changed(flat_map("int8"), enc="sparse"), "bad_encoding", "'sparse' is not 'flat'"),
    (changed(flat_map("<f4"), enc=b"flat"), "bad_encoding", "is not 'flat'"),
    # size, count, low
    (changed(flat_map("int8"), size=26), "layout_mismatch", "size is 26, the model has 25"),
    (changed(flat_map("int8"), size=24), "layout_mismatch", "size is 24, the model has 25"),
    (changed(flat_map("int8"), size=0), "layout_mismatch", "size is 0, the model has 25"),
    (changed(flat_map("int8"), size=101), "oversized", "size 101 is not in 0..100"),
    (changed(flat_map("int8"), size=2**64 - 1), "oversized", "is not in 0..100"),
    (changed(flat_map("int8"), size=-1), "oversized", "size -1"),
    (changed(flat_map("int8"), size=25.0), "bad_field", "delta.size"),
    (changed(flat_map("int8"), size=True), "bad_field", "delta.size"),
    (changed(flat_map("int8"), size=DELETE), "bad_field", "delta.size"),
    (changed(flat_map("int8"), count=26), "bad_index", "count 26 is not in 0..25"),
    (changed(flat_map("int8"), count=-1), "bad_index", "count -1 is not in 0..25"),
    (changed(flat_map("int8"), count=5), "bad_index", "has 6 set bits, count is 5"),
    (changed(flat_map("int8"), count=7), "bad_index", "has 6 set bits, count is 7"),
    (changed(flat_map("int8"), count=0), "bad_index", "lower holds 1 bytes, needs 0"),
    (changed(flat_map("int8"), count="6"), "bad_field", "delta.count"),
    (changed(flat_map("int8"), count=DELETE), "bad_field", "delta.count"),
    (changed(flat_map("int8"), low=2), "bad_index", "lower holds 1 bytes, needs 2"),
    (changed(flat_map("int8"), low=41), "bad_index", "delta.low 41 is not in 0..40"),
    (changed(flat_map("int8"), low=-1), "bad_index", "delta.low -1 is not in 0..40"),
    (changed(flat_map("int8"), low=True), "bad_field", "delta.low"),
    (changed(flat_map("int8"), low=1.0), "bad_field", "delta.low"),
    (changed(flat_map("int8"), low=DELETE), "bad_field", "delta.low"),
    # upper and lower
    (changed(flat_map("int8"), upper=DELETE), "bad_field", "delta.upper must be bytes"),
    (changed(flat_map("int8"), upper="abc"), "bad_field", "delta.upper must be bytes"),
    (changed(flat_map("int8"), upper=[1, 2]), "bad_field", "delta.upper must be bytes"),
    (changed(flat_map("int8"), lower=DELETE), "bad_field", "delta.lower must be bytes"),
    (changed(flat_map("int8"), lower=None), "bad_field", "delta.lower must be bytes"),
    (changed(flat_map("int8"), upper=b""), "bad_index", "upper holds 0 bytes, needs 1..3"),
    (changed(flat_map("int8"), upper=flat_map("int8")["upper"] + b"\0"), "bad_index", "ending in a set bit"),
    (changed(flat_map("int8"), upper=flat_map("int8")["upper"] + b"\1"), "bad_index", "holds 4 bytes, needs 1..3"),
    (changed(flat_map("int8"), upper=b"\x01" * TOO_BIG), "bad_index", "holds 10485760 bytes"),
    (changed(flat_map("int8"), upper=b"\x03\x00\x01"), "bad_index", "has 3 set bits, count is 6"),
    (changed(flat_map("int8"), lower=b""), "bad_index", "lower holds 0 bytes, needs 1"),
    (changed(flat_map("int8"), lower=b"\0\0"), "bad_index", "lower holds 2 bytes, needs 1"),
    (changed(flat_map("int8"), upper=elias_fano_by_hand([0, 7, 7, 20, 22, 24], 1).upper), "bad_index", "repeats a position"),
    (changed(flat_map("int8"), upper=b"\x01\x00\x00\x00\xf8\x01"), "bad_index", "holds 6 bytes"),
    # quantized values
    (changed(flat_map("int8"), scales=DELETE), "bad_field", "delta.scales must be bytes"),
    (changed(flat_map("int8"), scales=[1.0]), "bad_field", "delta.scales must be bytes"),
    (changed(flat_map("int8"), scales=flat_map("int8")["scales"][:12]), "bad_shape", "scales holds 12 bytes, needs 16"),  # ceil(6 / 2) scales: one run
    (changed(flat_map("int8"), scales=flat_map("int8")["scales"] + b"\0" * 4), "bad_shape", "needs 16"),
    (changed(flat_map("int8"), scales=b""), "bad_shape", "needs 16"),
    (changed(flat_map("int8"), scales=np.array([1, np.nan, 1, 1], "<f4").tobytes()), "non_finite", "delta.scales"),
    (changed(flat_map("int8"), scales=np.array([1, 1, np.inf, 1], "<f4").tobytes()), "non_finite", "delta.scales"),
    (changed(flat_map("int8"), scales=np.array([1, 1, 1, -0.5], "<f4").tobytes()), "non_finite", "delta.scales"),
    (changed(flat_map("sign"), scales=np.array([1e31, 1, 1, 1], "<f4").tobytes()), "non_finite", "delta.scales"),
    (changed(flat_map("int8"), data=DELETE), "bad_field", "delta.data must be bytes"),
    (changed(flat_map("int8"), data="codes"), "bad_field", "delta.data must be bytes"),
    (changed(flat_map("int8"), data=flat_map("int8")["data"][:-1]), "bad_shape", "data holds 5 bytes, needs 6"),
    (changed(flat_map("int4"), data=flat_map("int4")["data"] + b"\x88"), "bad_shape", "data holds 4 bytes, needs 3"),
    (changed(flat_map("sign"), data=b""), "bad_shape", "data holds 0 bytes, needs 1"),
    (changed(flat_map("sign"), data=b"\xff\x00"), "bad_shape", "data holds 2 bytes, needs 1"),
    (changed(flat_map("int8"), data=b"\x00" + flat_map("int8")["data"][1:]), "bad_field", "below -127"),
    (changed(flat_map("int4"), data=b"\x80" + flat_map("int4")["data"][1:]), "bad_field", "below -7"),
    (changed(flat_map("int8"), bits=2), "bad_field", "bits is 2, not one of (8, 4, 1)"),
    (changed(flat_map("int8"), bits=16), "bad_field", "bits is 16"),
    (changed(flat_map("int8"), bits="8"), "bad_field", "delta.bits"),
    (changed(flat_map("int8"), bits=True), "bad_field", "delta.bits"),
    (changed(flat_map("int8"), bits=None), "bad_field", "delta.bits"),
    (changed(flat_map("int8"), bits=4), "bad_shape", "data holds 6 bytes, needs 3"),
    (changed(flat_map("int8"), chunk=0), "bad_field", "chunk 0 is not in 1..1048576"),
    (changed(flat_map("int8"), chunk=-2), "bad_field", "chunk -2"),
    (changed(flat_map("int8"), chunk=(1 << 20) + 1), "bad_field", "chunk 1048577"),
    (changed(flat_map("int8"), chunk=2.0), "bad_field", "delta.chunk"),
    (changed(flat_map("int8"), chunk=DELETE), "bad_field", "delta.chunk"),
    (changed(flat_map("int8"), chunk=3), "bad_shape", "scales holds 16 bytes, needs 8"),
    (changed(flat_map("<f4"), bits=8), "bad_field", "delta.chunk"),
    # dense values
    (changed(flat_map("<f4"), data=np.array([1, 2, np.nan, 4, 5, 6], "<f4").tobytes()), "non_finite", "NaN, Inf"),
    (changed(flat_map("<f4"), data=np.array([1, 2, 3, 4, 5, -np.inf], "<f4").tobytes()), "non_finite", "NaN, Inf"),
    (changed(flat_map("<f2"), data=np.array([1, np.inf, 3, 4, 5, 6], "<f2").tobytes()), "non_finite", "NaN, Inf"),
    (changed(flat_map("<f2"), data=np.array([1, 2, 3, 4, 5, np.nan], "<f2").tobytes()), "non_finite", "NaN, Inf"),
    (changed(flat_map("<f4"), data=np.array([1, 2, 3, 1e16, 5, 6], "<f4").tobytes()), "out_of_range", "beyond 1e15"),
    (changed(flat_map("<f4"), data=np.array([-2e15, 2, 3, 4, 5, 6], "<f4").tobytes()), "out_of_range", "beyond 1e15"),
    (changed(flat_map("<f4"), dtype="<f8"), "bad_dtype", "'<f8'"),
    (changed(flat_map("<f4"), dtype="int8"), "bad_dtype", "'int8'"),
    (changed(flat_map("<f4"), dtype=DELETE), "bad_dtype", "None"),
    (changed(flat_map("<f4"), dtype="<f2"), "bad_shape", "delta.data holds 24 bytes"),
    (changed(flat_map("<f4"), data=flat_map("<f4")["data"][:-4]), "bad_shape", "delta.data holds 20 bytes"),
    (changed(flat_map("<f2"), data=DELETE), "bad_field", "delta.data must be bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "reason", "words"), HOSTILE_FLAT)
def test_hostile_flat_maps_are_refused_with_a_reason(obj, reason, words):
    with pytest.raises(SchemaError) as info:
        decode(obj)
    assert info.value.reason == reason, str(info.value)
    assert words in info.value.detail, info.value.detail
    assert info.value.detail.startswith("delta")


def test_the_element_limit_holds_with_or_without_a_layout():
    for layout in (LAYOUT, None):
        assert decode(flat_map("<f4"), layout, max_elements=25).positions.size == 6
        with pytest.raises(SchemaError) as info:
            decode(flat_map("<f4"), layout, max_elements=24)
        assert info.value.reason == "oversized" and "size 25 is not in 0..24" in str(info.value)


def test_a_flat_delta_is_read_as_flat_only_with_flat_in_the_spec():
    rng = np.random.default_rng(3)
    delta = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in LAYOUT.items()}
    encoded, _ = parse_spec("topk:0.2+int8+ef").compress(delta, rng, error_feedback_init(LAYOUT))
    per_tensor = msgpack.unpackb(encode(make_update(encoded, "topk:0.2+int8+ef")), raw=False)
    flat = msgpack.unpackb(encode(make_update(encoded, "topk:0.2+int8+ef+flat")), raw=False)
    swapped = [
        (per_tensor | {"compression": "topk:0.2+int8+ef+flat"}, "bad_encoding"),
        (flat | {"compression": "topk:0.2+int8+ef"}, "layout_mismatch"),
        (flat | {"delta": zlib.compress(msgpack.packb(flat["delta"]))}, "bad_field"),
        (flat | {"compression": "topk:0.2+int8+ef+flat+zlib"}, "bad_field"),
    ]
    for obj, reason in swapped:
        with pytest.raises(SchemaError) as info:
            decode_update(msgpack.packb(obj, use_bin_type=True), layout=LAYOUT)
        assert info.value.reason == reason, str(info.value)


# --------------------------------------------------------------------------- fuzzing

# Keys to break, the bytes ones (where the checks are subtle) first and three times as likely.
FLAT_KEYS = [*["upper", "lower", "scales", "data"] * 3,
             "size", "count", "low", "dtype", "bits", "chunk", "enc"]  # fmt: skip
JUNK = (
    st.integers(-3, 300) | st.sampled_from([2**31, 2**63 - 1, 1 << 20, 40, 41])
    | st.booleans() | st.floats(allow_nan=True) | st.binary(max_size=24) | VALUES
)  # fmt: skip


def check_valid(flat: FlatSparse, size: int, count: int) -> None:
    """What an accepted flat delta promises the aggregator."""
    positions = flat.positions
    assert positions.dtype == np.int64 and positions.size == count
    assert (np.diff(positions) > 0).all()
    assert not positions.size or (positions[0] >= 0 and positions[-1] < size)
    values = flat.values_f32()
    assert values.dtype == np.float32 and values.size == count and np.isfinite(values).all()
    layout = dict(flat.layout)
    assert sum(int(np.prod(shape, dtype=np.int64)) for shape in layout.values()) == size
    one, many = WeightedSum(layout), WeightedSum(layout)
    one.add(flat, 2**24)  # the one scatter-add ...
    many.add({name: flat[name] for name in flat}, 2**24)  # ... and tensor by tensor
    for name, shape in layout.items():
        tensor = flat[name]
        assert isinstance(tensor, Sparse) and tensor.shape == shape
        assert (
            not tensor.indices.size
            or 0 <= tensor.indices.min() <= tensor.indices.max() < np.prod(shape)
        )
        assert np.isfinite(one.sums[name]).all()
        assert np.array_equal(one.sums[name].view(np.uint64), many.sums[name].view(np.uint64))


@PROPERTY
@given(case=compressed_deltas(), data=st.data())
def test_mutated_flat_maps_decode_to_valid_deltas_or_raise_schema_error(case, data):
    layout, _spec, encoded = case
    obj = wire(encode_flat(encoded))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(FLAT_KEYS))
        value = obj.get(key)
        how = data.draw(st.sampled_from(["flip", "flip", "cut", "extend", "junk", "delete"]))
        if how == "delete":
            obj.pop(key, None)
        elif how == "junk" or not isinstance(value, bytes):
            obj[key] = data.draw(JUNK)
        elif how == "cut":
            obj[key] = value[: data.draw(st.integers(0, max(0, len(value) - 1)))]
        elif how == "extend":
            obj[key] = value + data.draw(st.binary(min_size=1, max_size=9))
        elif value:
            raw = bytearray(value)
            for _ in range(data.draw(st.integers(1, 3))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
            obj[key] = bytes(raw)
    use_layout = data.draw(st.sampled_from([True, True, False]))
    max_elements = data.draw(st.sampled_from([1 << 20] * 5 + [600, 30, 0]))
    try:
        flat = decode(obj, layout if use_layout else None, max_elements)
    except SchemaError as error:
        assert error.reason in SLUGS, str(error)
        assert error.detail.startswith("delta")
        return
    assert isinstance(flat, FlatSparse)
    check_valid(flat, obj["size"], obj["count"])
    if not use_layout:
        assert list(flat) == [FLAT_LAYOUT_NAME]


@PROPERTY
@given(case=compressed_deltas(), data=st.data())
def test_mutated_bytes_inside_a_zlib_flat_delta_decode_or_raise_schema_error(case, data):
    """Broken msgpack under intact zlib: any byte of the packed flat map flipped, the map
    cut short or followed by junk."""
    layout, spec, encoded = case
    obj = msgpack.unpackb(encode(make_update(encoded, f"{spec}+flat+zlib")), raw=False)
    packed = bytearray(zlib.decompress(obj["delta"]))
    how = data.draw(st.sampled_from(["flip", "flip", "flip", "cut", "junk"]))
    spot = data.draw(st.randoms(use_true_random=False))  # anywhere, not mostly the header
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            packed[spot.randrange(len(packed))] ^= spot.randrange(1, 256)
    elif how == "cut":
        del packed[spot.randrange(len(packed)) :]
    else:
        packed += data.draw(st.binary(min_size=1, max_size=3))
    obj["delta"] = zlib.compress(bytes(packed))
    try:
        update = decode_update(msgpack.packb(obj, use_bin_type=True), layout=layout)
    except SchemaError as error:
        assert error.reason in SLUGS, str(error)
        return
    assert isinstance(update.delta, FlatSparse)
    size = sum(int(np.prod(shape, dtype=np.int64)) for shape in layout.values())
    check_valid(update.delta, size, update.delta.positions.size)


# =========================================================================== encoder


def sparse(values: Any, size: int = 6) -> Sparse:
    return Sparse(shape=(size,), indices=np.array([1, 4], np.int64), values=values)


TWO = np.array([0.5, -1.0], np.float32)
UNFLATTENABLE = [  # (delta, words in the ValueError)
    ({}, "every tensor sparse"),
    ({"w": TWO}, "every tensor sparse"),
    ({"w": quantize_values(TWO, 8, 256, np.random.default_rng(0))}, "every tensor sparse"),
    ({"a": sparse(TWO), "b": TWO}, "every tensor sparse"),
    ({"a": TWO, "b": sparse(TWO)}, "every tensor sparse"),
    ({"a": sparse(sign_values(TWO, 256)), "b": sparse(quantize_values(TWO, 8, 256, np.random.default_rng(0)))}, "one bit width and one chunk"),
    ({"a": sparse(quantize_values(TWO, 8, 256, np.random.default_rng(0))), "b": sparse(quantize_values(TWO, 4, 256, np.random.default_rng(0)))}, "one bit width and one chunk"),
    ({"a": sparse(sign_values(TWO, 2)), "b": sparse(sign_values(TWO, 3))}, "one bit width and one chunk"),
    ({"a": sparse(sign_values(TWO, 2)), "b": sparse(TWO)}, "one bit width and one chunk"),
    ({"a": sparse(TWO), "b": sparse(sign_values(TWO, 2))}, "one value dtype"),
    ({"a": sparse(TWO), "b": sparse(TWO.astype(np.float16))}, "one value dtype"),
    ({"a": sparse(TWO.astype(np.float16)), "b": sparse(TWO)}, "one value dtype"),
]  # fmt: skip


@pytest.mark.parametrize(("delta", "words"), UNFLATTENABLE)
def test_encode_flat_refuses_what_one_run_cannot_hold(delta, words):
    with pytest.raises(ValueError, match=words) as info:
        encode_flat(delta)
    assert type(info.value) is ValueError  # the encoder's error, not a decoder's SchemaError


# =========================================================================== no layout


@pytest.mark.parametrize("values", ["", "+fp16"])
def test_without_a_layout_a_flat_update_reads_as_one_tensor_named_delta(values):
    layout = {"w": (4, 5), "b": (5,), "e": (0,), "c": (3, 2)}
    rng = np.random.default_rng(7)
    delta = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in layout.items()}
    spec = f"topk:0.3{values}+ef+flat"
    encoded, _ = parse_spec(spec).compress(delta, rng, error_feedback_init(layout))
    got = decode_update(encode(make_update(encoded, spec))).delta
    assert isinstance(got, FlatSparse)
    assert list(got) == [FLAT_LAYOUT_NAME] and len(got) == 1
    assert got.layout == ((FLAT_LAYOUT_NAME, (31,)),)
    tensor = got[FLAT_LAYOUT_NAME]
    assert isinstance(tensor, Sparse) and tensor.shape == (31,)
    whole = np.concatenate([to_dense(encoded[name]).reshape(-1) for name in layout])
    assert np.array_equal(bits_of(to_dense(tensor)), bits_of(whole))
    total = WeightedSum({FLAT_LAYOUT_NAME: (31,)})
    total.add(got, 3)
    assert np.array_equal(total.sums[FLAT_LAYOUT_NAME], (whole * np.float32(3)).astype(np.float64))


def test_without_a_layout_quantized_flat_values_are_refused_not_misread():
    """Each tensor's scales restart at its first kept element, so the values cannot be
    placed without the tensors' sizes. Here a keeps 200 and b 100 elements: 2 scales of
    chunk 256, as many as one tensor of 300 would have, which read so would give 56 of b's
    values a's scale."""
    layout: dict[str, tuple[int, ...]] = {"a": (200,), "b": (100,)}
    rng = np.random.default_rng(0)
    delta = {"a": rng.standard_normal(200).astype(np.float32),
             "b": 100 * rng.standard_normal(100).astype(np.float32)}  # fmt: skip
    spec = "topk:1+sign+ef+flat"
    encoded, _ = parse_spec(spec).compress(delta, rng, error_feedback_init(layout))
    payload = encode(make_update(encoded, spec))
    with_layout = decode_update(payload, layout=layout).delta
    for name in layout:
        assert_same_tensor(with_layout[name], encoded[name])
    single, _ = parse_spec(spec).compress(
        {"a": delta["a"]}, rng, error_feedback_init({"a": (200,)})
    )
    for quantized in (payload, encode(make_update(single, spec))):  # 2 scales; 1 scale
        with pytest.raises(SchemaError) as info:
            decode_update(quantized)
        assert info.value.reason == "layout_mismatch", str(info.value)
        assert info.value.detail == "delta has quantized values: needs the layout"


@pytest.mark.parametrize(
    "rule",
    ["fedavg", "median", "trimmed-mean:0.2", "fedavg+clip-median:2", "median+clip-norm:0.05"],
)
def test_every_aggregation_rule_gives_bitwise_the_same_delta_from_flat_updates(rule):
    """Robust rules read a flat update through its per-tensor view: the round's delta is
    the one the compressor's own per-tensor Sparse tensors give."""
    from fedmq.aggregator.robust import aggregate, parse_rule

    layout = {"w": (30, 20), "b": (20,), "v": (20, 4)}
    spec = "topk:0.2+sign+ef"
    flat_updates, tensor_updates = [], []
    for i in range(6):
        rng = np.random.default_rng(i)
        raw = {n: rng.normal(0, 0.01 * (i + 1), s).astype(np.float32) for n, s in layout.items()}
        encoded, _ = parse_spec(spec).compress(raw, rng, error_feedback_init(layout))
        payload = encode(make_update(encoded, spec + "+flat", num_examples=10 + i))
        flat_updates.append((decode_update(payload, layout=layout).delta, 10 + i))
        tensor_updates.append((encoded, 10 + i))  # the compressor's own Sparse tensors
    assert isinstance(flat_updates[0][0], FlatSparse)
    got = aggregate(parse_rule(rule), flat_updates, layout).delta
    want = aggregate(parse_rule(rule), tensor_updates, layout).delta
    for name in layout:
        assert np.array_equal(
            np.asarray(got[name]).view(np.uint64), np.asarray(want[name]).view(np.uint64)
        )


def test_low_out_of_range_is_named_before_the_bins_are_looked_at():
    """PROTOCOL 12.9 checks the keys in table order: `low` before `upper` and `lower`."""
    layout = {"w": (10,)}
    obj = {"enc": "flat", "size": 10, "count": 1, "low": 41, "upper": None, "lower": None}
    with pytest.raises(SchemaError) as info:
        decode_flat(obj, layout, max_elements=100)
    assert info.value.reason == "bad_index" and "delta.low 41" in info.value.detail
