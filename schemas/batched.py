"""All tensors of one update decoded in one pass, when they share one form (same wire
format): sparse with quantized values, or dense float32.

At 100x compression an update holds a few thousand numbers spread over a handful of
tensors, and decoding them one by one costs a dozen numpy calls per tensor: fixed
overhead that outweighs the numbers. Here the index, scale and code bytes of all
tensors are joined and decoded with one call each, positions land directly in the
model's flat layout (tensors one after the other, in layout order), and the result is a
``FlatSparse`` (``schemas.flat``), a read-only mapping that the aggregator folds into its
sum with a single scatter-add and that yields the per-tensor ``Sparse`` objects on demand.

A dense update of a small model pays the same fixed overhead per tensor (its checks,
``frombuffer``, the finiteness test, then a multiply and an add per tensor in the sum):
``decode_flat_dense`` joins the tensors' bytes into one float32 run, checks it with one
dot product and gives a ``FlatDense``, which the aggregator adds in one run and which
reads as the per-tensor arrays.

The batch paths only accept what the per-tensor decoder (``decode_encoded``) accepts,
and give the same numbers; when anything is off they return None and the caller decodes
tensor by tensor, which names the problem. So the wire format and every error message
stay those of ``schemas.encodings``.
"""

import functools
import itertools
import math
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from typing import Any, NamedTuple

import numpy as np

from fedmq.schemas.encodings.base import MAX_ABS
from fedmq.schemas.encodings.quantized import (
    _NIBBLE_PAIRS,
    _SIGN_OCTETS,
    QUANT_BITS,
    decode_scales,
)
from fedmq.schemas.encodings.sparse import decode_varints
from fedmq.schemas.errors import SchemaError
from fedmq.schemas.flat import FlatSparse, Layout
from fedmq.schemas.tensors import squared_norm

_INT_ONLY = frozenset([int])
# Byte values of varint continuation bytes: deleting them leaves one byte per varint.
_HIGH_BYTES = bytes(range(0x80, 0x100))


def decode_flat_sparse(
    wire: Mapping[str, Any], layout: Mapping[str, tuple[int, ...]], max_elements: int
) -> FlatSparse | None:
    """The whole delta ``wire`` (already checked to name ``layout``'s tensors in order) if
    every tensor is sparse with quantized values of one bit width and all is valid;
    None otherwise (the caller then decodes tensor by tensor)."""
    try:
        return _decode(wire, layout, max_elements)
    except (SchemaError, ValueError, TypeError, IndexError):
        return None


def _decode(
    wire: Mapping[str, Any], layout: Mapping[str, tuple[int, ...]], max_elements: int
) -> FlatSparse | None:
    # Headers, in Python: every numpy call costs a microsecond or two, a dict look-up far less.
    bits = None
    indexes, scale_bytes, data_bytes, runs, per_scale = [], [], [], [], []
    parts: dict[str, tuple[int, int, int, int, int, int]] = {}
    live: list[tuple[int, int, int]] = []  # (first value, offset, size) of non-empty tensors
    offset = first = n_scales = 0
    for name, obj in wire.items():
        if not isinstance(obj, dict) or obj.get("enc") != "sparse" or "bits" not in obj:
            return None
        shape = layout[name]
        size = math.prod(shape)
        wire_shape = obj.get("shape")
        if (
            wire_shape != list(shape)
            or not _INT_ONLY.issuperset(map(type, wire_shape))  # no 1.0 or True for 1
            or offset + size > max_elements
            or (size == 0 and max(shape, default=0) > max_elements - offset)
        ):
            return None
        count, chunk = obj.get("count"), obj.get("chunk")
        index, scales, data = obj.get("index"), obj.get("scales"), obj.get("data")
        if bits is None:
            bits = obj["bits"]
            if type(bits) is not int or bits not in QUANT_BITS:
                return None
        if (
            type(obj["bits"]) is not int
            or obj["bits"] != bits
            or type(count) is not int
            or type(chunk) is not int
            or not 0 <= count <= size
            or not 1 <= chunk <= 1 << 20
            or not isinstance(index, bytes)
            or not isinstance(scales, bytes)
            or not isinstance(data, bytes)
            or len(scales) != 4 * -(-count // chunk)
            or len(data) != -(-count * bits // 8)
            # exactly ``count`` varints, the last one ending with this tensor's bytes
            or len(index.translate(None, _HIGH_BYTES)) != count
            or (index and index[-1] >= 0x80)
        ):
            return None
        chunked = -(-count // chunk)
        parts[name] = (offset, first, first + count, chunk, n_scales, n_scales + chunked)
        if count:
            live.append((first, offset, size))
            per_scale += [chunk] * (chunked - 1)
            per_scale.append(count - (chunked - 1) * chunk)
        indexes.append(index)
        scale_bytes.append(scales)
        data_bytes.append(data)
        runs.append((first, first + count, len(data) * 8 // bits - count))
        offset += size
        first += count
        n_scales += chunked
    if bits is None:
        return None
    total = first

    scales = decode_scales(b"".join(scale_bytes), n_scales, "delta")  # SchemaError: None
    raw = np.frombuffer(b"".join(data_bytes), dtype=np.uint8)
    if bits == 1:
        codes = np.take(_SIGN_OCTETS, raw).view(np.int8)
    elif bits == 8:
        codes = (raw ^ 0x80).view(np.int8)
    else:
        codes = np.take(_NIBBLE_PAIRS, raw).view(np.int8)
    if codes.size != total:  # drop each tensor's padding after its last code
        slots, pad = [], 0
        for start, stop, padding in runs:
            slots.append(codes[start + pad : stop + pad])
            pad += padding
        codes = np.concatenate(slots)
    if bits > 1 and total and codes.min() < -((1 << (bits - 1)) - 1):
        return None

    gaps = decode_varints(b"".join(indexes), total, "delta")
    if live:
        # Each tensor's last position (its gaps' sum) must lie inside it; then the first
        # gap of each tensor also jumps from the previous tensor's last position to this
        # tensor's offset, and one cumulative sum gives positions in the flat layout.
        starts = [start for start, _, _ in live]
        lasts = np.add.reduceat(gaps, starts).tolist()
        jumps, previous = [], 0
        for (_, base, size), last in zip(live, lasts, strict=True):
            if last >= size:
                return None
            jumps.append(base - previous)
            previous = base + last
        gaps[starts] += jumps
        # Within a tensor positions strictly increase (no zero gap after its first); across
        # tensors they do by construction.
        if total > 1 and gaps[1:].min() == 0:
            return None
    positions = gaps.cumsum()
    scale_of = np.repeat(scales, per_scale)
    return FlatSparse(
        tuple((name, tuple(shape)) for name, shape in layout.items()), positions, parts,
        codes=codes, scales=scales, bits=bits, scale_of=scale_of,
    )  # fmt: skip


# ------------------------------------------------------------------------ dense float32

_F32 = np.dtype("<f4")
# Elements per step when a FlatDense is added into a float64 sum (256 KiB of float32).
_ADD_CHUNK = 65536


class FlatDense(Mapping[str, np.ndarray]):
    """A dense float32 delta over a whole layout: the tensors one after the other (layout
    order, each in C order) in ``array``. As a mapping it gives each tensor as the
    read-only array the per-tensor decoder returns (a view, made on first use: the fold
    under plain FedAvg reads ``array`` only)."""

    __slots__ = ("_views", "array", "layout")

    def __init__(self, layout: Layout, array: np.ndarray) -> None:
        self.layout = layout
        self.array = array
        self._views: dict[str, np.ndarray] | None = None

    def _by_name(self) -> dict[str, np.ndarray]:
        if self._views is None:
            views = {}
            offset = 0
            for name, shape in self.layout:
                size = math.prod(shape)
                views[name] = self.array[offset : offset + size].reshape(shape)
                offset += size
            self._views = views
        return self._views

    def add_scaled_into(self, total: np.ndarray, scale: np.float32) -> None:
        """``total += scale * delta`` over the layout laid end to end (``WholeDelta``):
        per element the float32 product added in float64, as tensor by tensor."""
        step = min(_ADD_CHUNK, self.array.size)
        if step == self.array.size:  # one step (a small model): two numpy calls
            np.add(total, np.multiply(self.array, scale), out=total)
            return
        scratch = np.empty(step, dtype=np.float32)
        for start in range(0, self.array.size, step):
            stop = min(start + step, self.array.size)
            scaled = scratch[: stop - start]
            np.multiply(self.array[start:stop], scale, out=scaled)
            window = total[start:stop]
            np.add(window, scaled, out=window)

    def form_sample(self) -> tuple[str, np.ndarray]:
        """The first tensor (``WholeDelta``), without the views of the others."""
        name, shape = self.layout[0]
        return name, self.array[: math.prod(shape)].reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._by_name()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name()

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.layout)

    def items(self) -> ItemsView[str, np.ndarray]:
        return self._by_name().items()

    def values(self) -> ValuesView[np.ndarray]:
        return self._by_name().values()

    def __len__(self) -> int:
        return len(self.layout)


class _DenseLayout(NamedTuple):
    """What a dense float32 delta over a layout looks like on the wire, worked out once
    per layout (``_dense_layout``) instead of once per update."""

    layout: Layout
    tensors: tuple[tuple[list[int], int], ...]  # per tensor: wire shape, data bytes
    size: int  # elements in all


@functools.lru_cache(maxsize=16)
def _dense_layout(layout: Layout) -> _DenseLayout:
    tensors = tuple((list(shape), 4 * math.prod(shape)) for _, shape in layout)
    return _DenseLayout(layout, tensors, sum(math.prod(shape) for _, shape in layout))


def _prepared(layout: Mapping[str, tuple[int, ...]]) -> _DenseLayout:
    try:
        return _dense_layout(tuple(layout.items()))  # shapes are tuples: one hash, cached
    except TypeError:  # a shape given as a list: not hashable, worked out for this call
        return _dense_layout.__wrapped__(tuple((n, tuple(s)) for n, s in layout.items()))


def decode_flat_dense(
    wire: Mapping[str, Any], layout: Mapping[str, tuple[int, ...]], max_elements: int
) -> FlatDense | None:
    """The whole delta ``wire`` (already checked to name ``layout``'s tensors in order) if
    every tensor is dense float32 of its layout's shape, with every value finite and at
    most ``MAX_ABS`` (one sum of squares below MAX_ABS**2 says so); None otherwise (the
    caller then decodes tensor by tensor, which names the problem)."""
    expected = _prepared(layout)
    if expected.size > max_elements:
        return None
    chunks, shapes = [], []
    for obj, (wire_shape, nbytes) in zip(wire.values(), expected.tensors, strict=True):
        if not isinstance(obj, dict):
            return None
        data, shape = obj.get("data"), obj.get("shape")
        if (
            obj.get("dtype") != "<f4"
            or not isinstance(data, bytes)
            or len(data) != nbytes
            or shape != wire_shape
            or obj.get("enc", "dense") != "dense"
        ):
            return None
        chunks.append(data)
        shapes.append(shape)
    # equal to the layout's, but 1.0 or True equal 1: every dimension's type, all at once
    if not _INT_ONLY.issuperset(map(type, itertools.chain.from_iterable(shapes))):
        return None
    values = np.frombuffer(b"".join(chunks), dtype=_F32)
    if not squared_norm(values) <= MAX_ABS * MAX_ABS:  # NaN, Inf, or some value too large
        return None
    return FlatDense(expected.layout, values)
