"""The sparse form: the kept elements of a tensor, by flat position.

``{"enc": "sparse", "shape", "count": k, "index": bin, ...values}``: k elements of the
flattened tensor at strictly increasing positions; ``index`` holds the gaps between
positions (the first one from 0) as unsigned LEB128 varints; all other elements are 0.
The k values follow inline in the same map, either as ``"dtype", "data"`` (dense) or as
``"bits", "chunk", "scales", "data"`` (quantized) — no nested map, no repeated shape:
at 100x compression every header byte shows.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmq.schemas.encodings.base import Reader, encoding_of, wire_bin, wire_int, wire_shape
from fedmq.schemas.encodings.quantized import Quantized, decode_quantized
from fedmq.schemas.errors import SchemaError
from fedmq.schemas.tensors import decode_tensor

MAX_VARINT_BYTES = 5  # positions < 2**35, far above any tensor we accept


@dataclass(frozen=True)
class Sparse:
    """The non-zero elements of a tensor, by flat position."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int64, strictly increasing, in [0, prod(shape))
    values: "np.ndarray | Quantized"  # k values

    def values_f32(self) -> np.ndarray:
        return encoding_of(self.values).values(self.values)


# ------------------------------------------------------------------------ varints


def encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value (vectorised)."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return b""
    lengths = np.ones(values.size, dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lengths += values >= (np.uint64(1) << np.uint64(7 * j))
    if (values >= (np.uint64(1) << np.uint64(7 * MAX_VARINT_BYTES))).any():
        raise ValueError("value too large for a varint index")
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for j in range(MAX_VARINT_BYTES):
        has = lengths > j
        byte = (values[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def decode_varints(data: bytes, count: int, field: str) -> np.ndarray:
    """Exactly ``count`` unsigned LEB128 values filling ``data``, as int64.

    At top-k densities of a few percent nearly every gap takes one byte and the rest two:
    the few continuation bytes are patched in place. Longer varints take one pass per
    byte of the longest."""
    raw = np.frombuffer(data, dtype=np.uint8)
    high = (raw >= 0x80).nonzero()[0]  # continuation bytes; every other byte ends a varint
    if len(raw) - high.size != count or (high.size and high[-1] == len(raw) - 1):
        raise SchemaError("bad_index", f"{field} does not hold exactly {count} varints")
    if not high.size:
        return raw.astype(np.int64)
    if not (raw[high + 1] >= 0x80).any():  # each is followed by a last byte: 2 bytes at most
        values = raw[raw < 0x80].astype(np.int64)  # each varint's last byte: bits 7.. if 2
        two = high - np.arange(high.size)  # the varints of two bytes
        values[two] = (values[two] << 7) + raw[high] - 0x80  # bits 0..6 from the first byte
        return values
    ends = (raw < 0x80).nonzero()[0]
    lengths = np.empty(count, dtype=np.int64)
    lengths[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=lengths[1:])
    longest = int(lengths.max())
    if longest > MAX_VARINT_BYTES:
        raise SchemaError("bad_index", f"{field} has a varint longer than {MAX_VARINT_BYTES} bytes")
    values = raw[ends].astype(np.int64)
    for back in range(1, longest):  # byte ``back`` places before the end: 7 bits lower
        earlier = (raw[ends - back] & 0x7F).astype(np.int64)  # index -1 wraps; masked below
        values = np.where(lengths > back, (values << 7) | earlier, values)
    return values


# ------------------------------------------------------------------------ the encoding


def _decode_values(obj: Mapping[str, Any], field: str, count: int) -> "np.ndarray | Quantized":
    """The k values inlined in a sparse map: quantized if it has ``bits``, else dense."""
    if "bits" in obj:
        return decode_quantized(obj, field, count, flat=count)
    return decode_tensor({**obj, "shape": [count]}, field, max_elements=count)


class SparseEncoding:
    tag = "sparse"
    kind = Sparse

    def decode(self, obj: Mapping[str, Any], field: str, *, max_elements: int) -> Sparse:
        shape, size = wire_shape(obj, field, max_elements)
        count = wire_int(obj, "count", field)
        if not 0 <= count <= size:
            raise SchemaError("bad_index", f"{field}.count {count} is not in 0..{size}")
        gaps = decode_varints(wire_bin(obj, "index", field), count, f"{field}.index")
        if count > 1 and gaps[1:].min() == 0:
            raise SchemaError("bad_index", f"{field}.index repeats a position")
        indices = gaps.cumsum()
        if count and indices[-1] >= size:
            raise SchemaError("bad_index", f"{field}.index points past the {size} elements")
        values = _decode_values(obj, field, count)
        return Sparse(shape=shape, indices=indices, values=values)

    def encode(self, tensor: Sparse) -> dict[str, Any]:
        gaps = np.diff(tensor.indices, prepend=0)
        values = encoding_of(tensor.values).encode(tensor.values)
        values.pop("enc", None)
        values.pop("shape")
        return {
            "enc": "sparse",
            "shape": list(tensor.shape),
            "count": int(tensor.indices.size),
            "index": encode_varints(gaps),
            **values,
        }

    def shape(self, tensor: Sparse) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def to_dense(self, tensor: Sparse) -> np.ndarray:
        dense = np.zeros(math.prod(tensor.shape), dtype=np.float32)
        dense[tensor.indices] = tensor.values_f32()
        return dense.reshape(tensor.shape)

    def values(self, tensor: Sparse) -> np.ndarray:
        return tensor.values_f32()

    def value_problem(self, tensor: Sparse) -> str | None:
        return encoding_of(tensor.values).value_problem(tensor.values)

    def add_scaled_into(
        self, tensor: Sparse, total: np.ndarray, scale: np.float32, scratch: np.ndarray
    ) -> None:
        total[tensor.indices] += tensor.values_f32() * scale  # O(k); positions are unique

    def scaled(self, tensor: Sparse, scale: np.float32) -> Sparse:
        return replace(tensor, values=encoding_of(tensor.values).scaled(tensor.values, scale))

    def reader(self, tensor: Sparse) -> Reader:
        indices, values = tensor.indices, tensor.values_f32()

        def read(start: int, stop: int, out: np.ndarray) -> None:
            lo, hi = np.searchsorted(indices, (start, stop))
            out[:] = 0
            out[indices[lo:hi] - start] = values[lo:hi]

        return read

    def map_values(self, tensor: Sparse, fn: Callable[[np.ndarray], Any]) -> Sparse:
        values = encoding_of(tensor.values).map_values(tensor.values, fn)
        return Sparse(shape=tensor.shape, indices=tensor.indices, values=values)


SPARSE = SparseEncoding()
