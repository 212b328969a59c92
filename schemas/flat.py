"""A whole sparse delta as one run: the ``flat`` wire form (docs/PROTOCOL.md 12.9).

With ``topk`` at 100x an update holds a few thousand numbers. Sent tensor by tensor,
each tensor pays a header (shape, count, chunk, key names: about 70 bytes) and the
decoder a dozen numpy calls, which together outweigh the numbers. The flat form sends
the kept elements of all tensors as one run instead, over the model's parameters laid
end to end (tensors in layout order, each flattened in C order):

    {"enc": "flat", "size": n, "count": k, "low": L, "upper": bin, "lower": bin,
     then the k values: "dtype", "data"  or  "bits", "chunk", "scales", "data"}

Positions are Elias-Fano coded (``schemas.eliasfano``). Values are those of the sparse
form, in position order; quantized values keep their per-tensor chunks (a tensor's
scales restart at its first kept element), so the aggregator adds exactly what the
node's compressor produced. Tensor names and shapes are not sent: they are the global
model's, which the update names by ``base_model_id``.

Decoding gives a ``FlatSparse``: the positions and values of the whole delta, which the
aggregator adds to its flat float64 sum with one scatter-add, and which reads as a
mapping of per-tensor ``Sparse`` objects for everything else.
"""

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedmq.schemas.eliasfano import MAX_LOW_BITS, EliasFano, decode_positions, encode_positions
from fedmq.schemas.encodings import (
    Encoded,
    Quantized,
    Sparse,
    decode_bits_and_chunk,
    decode_codes,
    decode_scales,
    encode_encoded,
    float16_into,
    value_problem,
)
from fedmq.schemas.encodings.base import wire_bin as _bin
from fedmq.schemas.encodings.base import wire_int as _int
from fedmq.schemas.errors import SchemaError
from fedmq.schemas.tensors import decode_tensor

Layout = tuple[tuple[str, tuple[int, ...]], ...]
# name -> (offset in the flat layout, first value, end value, chunk, first scale, end scale)
Parts = dict[str, tuple[int, int, int, int, int, int]]
FLAT_LAYOUT_NAME = "delta"  # the one tensor a flat delta reads as without the model's layout


class FlatSparse(Mapping[str, Encoded]):
    """A sparse delta over a whole layout.

    ``positions`` index the concatenation of the flattened tensors (int64, strictly
    increasing). The values are either ``dense`` (float32 or float16, one per position)
    or quantized: ``codes[i] * scales[chunk of i]`` in float32. As a mapping it gives
    each tensor as the ``Sparse`` the per-tensor decoder returns.
    """

    __slots__ = (
        "_parts", "_scale_of", "_shapes", "bits", "codes", "dense", "layout", "positions",
        "scales",
    )  # fmt: skip

    def __init__(
        self,
        layout: Layout,
        positions: np.ndarray,
        parts: Parts,
        *,
        dense: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        scales: np.ndarray | None = None,
        bits: int = 0,
        scale_of: np.ndarray | None = None,
    ) -> None:
        self.layout = layout
        self._shapes = dict(layout)
        self.positions = positions
        self._parts = parts
        self.dense = dense
        self.codes = codes
        self.scales = scales
        self.bits = bits
        self._scale_of = scale_of  # per value: its scale (float32)

    def values_f32(self) -> np.ndarray:
        """All values in position order, float32, exactly as the per-tensor forms give them."""
        if self.dense is not None:
            if self.dense.dtype == np.float16:
                return float16_into(self.dense, np.empty(self.dense.size, np.float32))
            return self.dense
        assert self.codes is not None and self._scale_of is not None
        return np.multiply(self.codes, self._scale_of, dtype=np.float32)

    def add_scaled_into(self, total: np.ndarray, scale: np.float32) -> None:
        """``total += scale * delta`` over the layout laid end to end (``WholeDelta``):
        one scatter-add, the same per element as adding tensor by tensor (positions are
        unique)."""
        total[self.positions] += self.values_f32() * scale

    def form_sample(self) -> tuple[str, Sparse]:
        """The first tensor (``WholeDelta``): every tensor's values are of one kind."""
        name = self.layout[0][0]
        return name, self[name]

    def __getitem__(self, name: str) -> Sparse:
        offset, first, end, chunk, s_first, s_end = self._parts[name]
        values: np.ndarray | Quantized
        if self.dense is not None:
            values = self.dense[first:end]
        else:
            assert self.codes is not None and self.scales is not None
            values = Quantized(
                shape=(end - first,), bits=self.bits, chunk=chunk,
                scales=self.scales[s_first:s_end], codes=self.codes[first:end],
            )  # fmt: skip
        return Sparse(
            shape=self._shapes[name], indices=self.positions[first:end] - offset, values=values
        )

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.layout)

    def __len__(self) -> int:
        return len(self.layout)


# ------------------------------------------------------------------------ encoding


def encode_flat(delta: Mapping[str, Encoded]) -> dict[str, Any]:
    """The flat wire map of a delta whose tensors are all sparse, with values of one kind
    (one dtype, or one bit width and chunk); ValueError otherwise."""
    tensors = list(delta.values())
    # isinstance on purpose here and below: the flat form is defined for sparse tensors
    # whose values share one kind, and this is the check that names the one allowed.
    if not tensors or not all(isinstance(t, Sparse) for t in tensors):
        raise ValueError("the flat form needs every tensor sparse (topk)")
    sparse: list[Sparse] = tensors  # type: ignore[assignment]
    sizes = [math.prod(t.shape) for t in sparse]
    offsets = np.cumsum([0, *sizes[:-1]], dtype=np.int64)
    positions = np.concatenate(
        [t.indices.astype(np.int64) + offset for t, offset in zip(sparse, offsets, strict=True)]
    )
    size = sum(sizes)
    code = encode_positions(positions, size)
    head = {"enc": "flat", "size": size, "count": int(positions.size), "low": code.low_bits,
            "upper": code.upper, "lower": code.lower}  # fmt: skip
    values = [t.values for t in sparse]
    first = values[0]
    if isinstance(first, Quantized):
        if not all(
            isinstance(v, Quantized) and (v.bits, v.chunk) == (first.bits, first.chunk)
            for v in values
        ):
            raise ValueError("the flat form needs one bit width and one chunk for all tensors")
        quantized: list[Quantized] = values  # type: ignore[assignment]
        joined = Quantized(
            shape=(int(positions.size),), bits=first.bits, chunk=first.chunk,
            scales=np.concatenate([v.scales for v in quantized]).astype("<f4"),
            codes=np.concatenate([v.codes for v in quantized]),
        )  # fmt: skip
        wire = encode_encoded(joined)
    else:
        if not all(isinstance(v, np.ndarray) and v.dtype == first.dtype for v in values):
            raise ValueError("the flat form needs one value dtype for all tensors")
        wire = encode_encoded(np.concatenate(values))  # type: ignore[arg-type]
    del wire["shape"]
    wire.pop("enc", None)
    return head | wire


# ------------------------------------------------------------------------ decoding


def decode_flat(
    obj: Any, layout: Mapping[str, tuple[int, ...]] | None, *, max_elements: int
) -> FlatSparse:
    """Check a flat delta against ``layout`` (without one: a single tensor of ``size``,
    dense values only)."""
    field = "delta"
    if not isinstance(obj, Mapping):
        raise SchemaError("bad_field", f"{field} must be a map, got {type(obj).__name__}")
    if obj.get("enc") != "flat":
        raise SchemaError("bad_encoding", f"{field}.enc {obj.get('enc')!r} is not 'flat'")
    size = _int(obj, "size", field)
    if not 0 <= size <= max_elements:
        raise SchemaError("oversized", f"{field}.size {size} is not in 0..{max_elements}")
    if layout is None:
        if "bits" in obj:  # each tensor's scales restart: without the tensors, no values
            raise SchemaError("layout_mismatch", f"{field} has quantized values: needs the layout")
        layout = {FLAT_LAYOUT_NAME: (size,)}
    sizes = [math.prod(shape) for shape in layout.values()]
    if sum(sizes) != size:
        raise SchemaError(
            "layout_mismatch", f"{field}.size is {size}, the model has {sum(sizes)} parameters"
        )
    count = _int(obj, "count", field)
    if not 0 <= count <= size:
        raise SchemaError("bad_index", f"{field}.count {count} is not in 0..{size}")
    low_bits = _int(obj, "low", field)
    if not 0 <= low_bits <= MAX_LOW_BITS:
        raise SchemaError("bad_index", f"{field}.low {low_bits} is not in 0..{MAX_LOW_BITS}")
    upper, lower = _bin(obj, "upper", field), _bin(obj, "lower", field)
    positions = decode_positions(EliasFano(low_bits, upper, lower), count, size, field)

    # Which tensor each run of values belongs to: tensors' offsets in the sorted positions.
    offsets = np.cumsum([0, *sizes], dtype=np.int64)
    bounds = np.searchsorted(positions, offsets).tolist()
    parts: Parts = {}
    if "bits" not in obj:
        dense = decode_tensor({**obj, "shape": [count]}, field, max_elements=count)
        problem = value_problem(dense)
        if problem is not None:
            raise SchemaError(problem, f"{field} holds NaN, Inf or a value beyond 1e15")
        for i, name in enumerate(layout):
            parts[name] = (int(offsets[i]), bounds[i], bounds[i + 1], 1, 0, 0)
        return FlatSparse(_frozen(layout), positions, parts, dense=dense)

    bits, chunk = decode_bits_and_chunk(obj, field)
    per_scale: list[int] = []  # values per scale, chunk after chunk, tensor after tensor
    n_scales = 0
    for i, name in enumerate(layout):
        kept = bounds[i + 1] - bounds[i]
        chunks = -(-kept // chunk)
        end_scale = n_scales + chunks
        parts[name] = (int(offsets[i]), bounds[i], bounds[i + 1], chunk, n_scales, end_scale)
        if kept:
            per_scale += [chunk] * (chunks - 1)
            per_scale.append(kept - (chunks - 1) * chunk)
        n_scales += chunks
    scales = decode_scales(_bin(obj, "scales", field), n_scales, field)
    codes = decode_codes(_bin(obj, "data", field), bits, count, field)
    return FlatSparse(
        _frozen(layout), positions, parts, codes=codes, scales=scales, bits=bits,
        scale_of=np.repeat(scales, per_scale),
    )  # fmt: skip


def _frozen(layout: Mapping[str, tuple[int, ...]]) -> Layout:
    return tuple((name, tuple(shape)) for name, shape in layout.items())
