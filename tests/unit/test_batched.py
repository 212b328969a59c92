"""The one-pass decoders of sparse, quantized and of dense float32 updates
(schemas.batched) against the per-tensor reference (schemas.encodings.decode_encoded):
they accept only what the reference accepts, give the same tensors, and the aggregator's
sum is bitwise the same."""

import copy
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.aggregator.fedavg import WeightedSum
from fedmq.compression.transforms import quantize_values, sign_values
from fedmq.schemas import NodeUpdate, SchemaError, decode_update, encode
from fedmq.schemas.batched import FlatDense, decode_flat_dense, decode_flat_sparse
from fedmq.schemas.encodings import Quantized, Sparse, decode_encoded, encode_encoded
from fedmq.schemas.flat import FlatSparse

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def sparse_deltas(draw: st.DrawFn) -> tuple[dict[str, tuple[int, ...]], dict[str, Sparse]]:
    """A layout of one to five tensors (some empty or unselected) and a sparse delta over
    it whose values are quantized with one bit width and a chunk per tensor."""
    bits = draw(st.sampled_from([1, 4, 8]))
    layout: dict[str, tuple[int, ...]] = {}
    delta: dict[str, Sparse] = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for i in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=2)))
        size = int(np.prod(shape, dtype=np.int64))
        layout[f"t{i}"] = shape
        count = draw(st.integers(0, size))
        positions = np.sort(rng.choice(size, count, replace=False)).astype(np.int64)
        values = rng.standard_normal(count).astype(np.float32) * np.float32(
            10.0 ** rng.integers(-6, 3)
        )
        chunk = draw(st.sampled_from([1, 2, 3, 7, 64, 1 << 20]))
        if bits == 1:
            coded = sign_values(values, chunk)
        else:
            coded = quantize_values(values, bits, chunk, rng)
        delta[f"t{i}"] = Sparse(shape=shape, indices=positions, values=coded)
    return layout, delta


def wire_of(delta: dict[str, Sparse]) -> dict[str, Any]:
    packed = msgpack.packb({n: encode_encoded(t) for n, t in delta.items()}, use_bin_type=True)
    return msgpack.unpackb(packed, raw=False, strict_map_key=True)


def reference(wire: dict[str, Any], max_elements: int = 1 << 20) -> dict[str, Any]:
    """Tensor by tensor, as ``schemas.messages._delta`` decodes without the batch path."""
    out, budget = {}, max_elements
    for name, obj in wire.items():
        out[name] = decode_encoded(obj, f"delta.{name}", max_elements=max(budget, 0))
        budget -= int(np.prod(out[name].shape, dtype=np.int64))
    return out


def assert_same(got: Sparse, want: Sparse) -> None:
    assert isinstance(got, Sparse) and isinstance(want, Sparse)
    assert got.shape == want.shape
    assert np.array_equal(got.indices, want.indices) and got.indices.dtype == np.int64
    assert isinstance(got.values, Quantized) and isinstance(want.values, Quantized)
    for field in ("shape", "bits", "chunk"):
        assert getattr(got.values, field) == getattr(want.values, field)
    assert np.array_equal(got.values.scales.view(np.uint32), want.values.scales.view(np.uint32))
    assert np.array_equal(got.values.codes, want.values.codes)


@PROPERTY
@given(case=sparse_deltas(), weights=st.lists(st.integers(1, 2**24), min_size=1, max_size=3))
def test_one_pass_decoding_equals_the_per_tensor_reference(case, weights):
    layout, delta = case
    wire = wire_of(delta)
    flat = decode_flat_sparse(wire, layout, 1 << 20)
    assert isinstance(flat, FlatSparse)
    want = reference(wire)
    assert list(flat) == list(layout) and len(flat) == len(layout)
    for name in layout:
        assert name in flat
        assert_same(flat[name], want[name])
    # The one scatter-add gives bitwise the sums of the per-tensor path.
    one, many = WeightedSum(layout), WeightedSum(layout)
    for weight in weights:
        one.add(flat, weight)
        many.add(want, weight)
    for name in layout:
        assert np.array_equal(one.sums[name].view(np.uint64), many.sums[name].view(np.uint64))
    assert (one.count, one.total_weight) == (many.count, many.total_weight)


def _mutate(data: st.DataObject, wire: dict[str, Any]) -> dict[str, Any]:
    wire = copy.deepcopy(wire)
    names = list(wire)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        obj = wire[name]
        key = data.draw(st.sampled_from(["shape", "count", "index", "bits", "chunk", "scales",
                                          "data", "enc", "dtype"]))  # fmt: skip
        how = data.draw(st.sampled_from(["delete", "int", "bytes", "move", "swap"]))
        value = obj.get(key)
        if how == "delete":
            obj.pop(key, None)
        elif how == "int":
            obj[key] = data.draw(st.integers(-2, 70) | st.sampled_from([2**31, True, 1.0]))
        elif how == "bytes" and isinstance(value, bytes):
            raw = bytearray(value)
            if raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            obj[key] = bytes(raw[: data.draw(st.integers(0, len(raw) + 1))]) + data.draw(
                st.binary(max_size=2)
            )
        elif how == "move" and key in ("index", "data", "scales"):  # shift bytes across tensors
            other = wire[data.draw(st.sampled_from(names))]
            if isinstance(value, bytes) and value and isinstance(other.get(key), bytes):
                obj[key], other[key] = value[:-1], other[key] + value[-1:]
        elif how == "swap":  # e.g. two tensors' counts or chunks exchanged: totals still add up
            other = wire[data.draw(st.sampled_from(names))]
            obj[key], other[key] = other.get(key), value
    return wire


@PROPERTY
@given(case=sparse_deltas(), data=st.data())
def test_one_pass_decoding_accepts_only_what_the_reference_accepts(case, data):
    layout, delta = case
    wire = _mutate(data, wire_of(delta))
    flat = decode_flat_sparse(wire, layout, data.draw(st.sampled_from([1 << 20, 60, 0])))
    if flat is None:
        return  # the caller decodes tensor by tensor and names the problem
    want = reference(wire)  # raises if the one-pass decoder accepted something invalid
    for name in layout:
        assert_same(flat[name], want[name])
        assert want[name].shape == layout[name]


def test_a_varint_split_between_two_tensors_is_refused_by_name() -> None:
    layout = {"a": (200,), "b": (200,)}
    delta = {
        name: Sparse(shape=(200,), indices=np.array([150], np.int64),
                     values=sign_values(np.ones(1, np.float32), 8))
        for name in layout
    }  # fmt: skip
    wire = wire_of(delta)
    assert wire["a"]["index"] == bytes([0x96, 0x01])  # 150 as a two-byte varint
    wire["a"]["index"], wire["b"]["index"] = b"\x96", b"\x01" + wire["b"]["index"]
    assert decode_flat_sparse(wire, layout, 1 << 20) is None
    payload = encode(
        NodeUpdate(federation="f", node_id="n", round=1, base_model_id="0" * 32,
                   num_examples=3, train_loss=0.1, train_seconds=0.0, delta=delta,
                   compression="topk:0.01+sign")
    )  # fmt: skip
    obj = msgpack.unpackb(payload, raw=False)
    obj["delta"] = wire
    try:
        decode_update(msgpack.packb(obj, use_bin_type=True), layout=layout)
    except SchemaError as error:
        assert error.reason == "bad_index" and error.detail.startswith("delta.a.index")
    else:
        raise AssertionError("a split varint was accepted")


def test_decode_update_gives_the_flat_form_for_sparse_quantized_updates() -> None:
    layout = {"w": (4, 5), "b": (5,)}
    delta = {
        "w": Sparse(shape=(4, 5), indices=np.array([0, 7, 19], np.int64),
                    values=sign_values(np.array([1, -2, 3], np.float32), 2)),
        "b": Sparse(shape=(5,), indices=np.array([0], np.int64),
                    values=sign_values(np.array([-1], np.float32), 2)),
    }  # fmt: skip
    update = NodeUpdate(federation="f", node_id="n", round=1, base_model_id="0" * 32,
                        num_examples=3, train_loss=0.1, train_seconds=0.0, delta=delta,
                        compression="topk:0.2+sign+zlib")  # fmt: skip
    got = decode_update(encode(update), layout=layout).delta
    assert isinstance(got, FlatSparse)
    assert got.positions.tolist() == [0, 7, 19, 20]
    assert got.values_f32().tolist() == [1.5, -1.5, 3.0, -1.0]  # sign x mean|x| per chunk
    # without a layout (no offsets to place tensors at) it decodes tensor by tensor
    assert not isinstance(decode_update(encode(update)).delta, FlatSparse)


# ------------------------------------------------------------------------ dense float32


@st.composite
def dense_deltas(draw: st.DrawFn) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """A layout of one to five tensors (some empty) and a dense float32 delta over it,
    with magnitudes from 1e-30 to 1e14 (and, rarely, the subnormal or the extreme)."""
    layout: dict[str, tuple[int, ...]] = {}
    delta: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for i in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
        layout[f"t{i}"] = shape
        scale = np.float32(10.0 ** draw(st.integers(-30, 14)))
        delta[f"t{i}"] = np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)
    return layout, delta


@PROPERTY
@given(case=dense_deltas(), weights=st.lists(st.integers(1, 2**24), min_size=1, max_size=3))
def test_dense_one_pass_decoding_equals_the_per_tensor_reference(case, weights):
    layout, delta = case
    wire = wire_of(delta)
    flat = decode_flat_dense(wire, layout, 1 << 20)
    if flat is None:  # only when the sum of squares leaves float32's range
        assert not np.dot(*(2 * [np.concatenate([d.ravel() for d in delta.values()])])) <= 1e30
        return
    assert isinstance(flat, FlatDense)
    want = reference(wire)
    assert list(flat) == list(layout) and len(flat) == len(layout)
    for name in layout:
        assert name in flat
        got = flat[name]
        assert got.dtype == want[name].dtype and got.shape == want[name].shape
        assert np.array_equal(got.view(np.uint32), want[name].view(np.uint32))
        assert not got.flags.writeable
    one, many = WeightedSum(layout), WeightedSum(layout)
    for weight in weights:
        one.add(flat, weight)
        many.add(want, weight)
    for name in layout:
        assert np.array_equal(one.sums[name].view(np.uint64), many.sums[name].view(np.uint64))
    assert (one.count, one.total_weight) == (many.count, many.total_weight)


@PROPERTY
@given(case=dense_deltas(), data=st.data())
def test_dense_one_pass_decoding_accepts_only_what_the_reference_accepts(case, data):
    layout, delta = case
    wire = copy.deepcopy(wire_of(delta))
    for _ in range(data.draw(st.integers(1, 3))):
        obj = wire[data.draw(st.sampled_from(list(wire)))]
        key = data.draw(st.sampled_from(["shape", "data", "dtype", "enc"]))
        value = data.draw(
            st.sampled_from([None, True, 1.0, 3, "<f2", "<f8", "dense", "sparse", [1], []])
            | st.binary(max_size=8)
        )
        if value is None:
            obj.pop(key, None)
        elif key == "data" and isinstance(obj.get("data"), bytes) and isinstance(value, bytes):
            raw = obj["data"]  # overwrite a few bytes: NaN, Inf or a huge value may appear
            at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
            obj["data"] = raw[:at] + value + raw[at + len(value) :]
        else:
            obj[key] = value
    flat = decode_flat_dense(wire, layout, data.draw(st.sampled_from([1 << 20, 60, 0])))
    if flat is None:
        return  # the caller decodes tensor by tensor and names the problem
    want = reference(wire)  # raises if the one-pass decoder accepted something invalid
    for name in layout:
        assert np.array_equal(flat[name].view(np.uint32), want[name].view(np.uint32))
        assert want[name].shape == layout[name]
        assert np.isfinite(want[name]).all() and not (np.abs(want[name]) > 1e15).any()


def test_decode_update_gives_the_dense_flat_form_and_names_a_bad_value_as_before() -> None:
    layout = {"w": (4, 5), "b": (5,)}
    delta = {"w": np.arange(20, dtype=np.float32).reshape(4, 5), "b": np.ones(5, np.float32)}
    update = NodeUpdate(federation="f", node_id="n", round=1, base_model_id="0" * 32,
                        num_examples=3, train_loss=0.1, train_seconds=0.0, delta=delta)  # fmt: skip
    got = decode_update(encode(update), layout=layout).delta
    assert isinstance(got, FlatDense)
    assert np.array_equal(got["w"], delta["w"]) and np.array_equal(got["b"], delta["b"])
    assert got.array.tolist() == list(range(20)) + [1.0] * 5
    for bad, reason in ((np.nan, "non_finite"), (np.inf, "non_finite"), (3e15, "out_of_range")):
        b = delta["b"].copy()
        b[2] = bad
        payload = encode(NodeUpdate(**{**update.__dict__, "delta": {"w": delta["w"], "b": b}}))
        try:
            decode_update(payload, layout=layout)
        except SchemaError as error:
            assert error.reason == reason and error.detail.startswith("delta.b ")
        else:
            raise AssertionError(f"{bad} was accepted")
    # float16 values and no layout: tensor by tensor, as before
    half = {name: array.astype(np.float16) for name, array in delta.items()}
    payload = encode(NodeUpdate(**{**update.__dict__, "delta": half, "compression": "fp16"}))
    assert not isinstance(decode_update(payload, layout=layout).delta, FlatDense)
    assert not isinstance(decode_update(encode(update)).delta, FlatDense)
