"""Compressed tensors on the wire: quantized and sparse forms, and their exact decoding.

A tensor map without ``"enc"`` is dense (``schemas.tensors``). Two more forms exist:

- ``{"enc": "quant", "shape", "bits": 8|4, "chunk", "scales": bin <f4, "data": bin}``:
  value = code * scales[i // chunk]; codes are signed, stored offset by 2**(bits-1)
  (8 bits: one byte each; 4 bits: two per byte, the first element in the low nibble).
- ``{"enc": "sparse", "shape", "count": k, "index": bin, ...values}``: k elements of the
  flattened tensor at strictly increasing positions; ``index`` holds the gaps between
  positions (the first one from 0) as unsigned LEB128 varints; all other elements are 0.
  The k values follow inline in the same map, either as ``"dtype", "data"`` (dense) or as
  ``"bits", "chunk", "scales", "data"`` (quantized) — no nested map, no repeated shape:
  at 100x compression every header byte shows.

Decoders check every length, range and ordering and raise ``SchemaError``; they return
the light objects below (views on the payload, no densifying), so the aggregator can fold
a sparse update into its sum in O(k).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.errors import SchemaError
from schemas.tensors import decode_tensor, encode_tensor, squared_norm

QUANT_BITS = (8, 4)
# Largest magnitude a delta value may have. Weighted by up to 2**24 examples in float32
# and summed over a round in float64 it stays finite with room to spare, so one accepted
# update can never turn the global model into Inf. Real deltas are many orders smaller.
MAX_ABS = 1e15
MAX_SCALE = MAX_ABS / 127  # |code| <= 127
MAX_VARINT_BYTES = 5  # positions < 2**35, far above any tensor we accept


@dataclass(frozen=True)
class Quantized:
    """Uniform symmetric quantization of a flat run of numbers, one scale per chunk."""

    shape: tuple[int, ...]
    bits: int
    chunk: int
    scales: np.ndarray  # float32, one per chunk
    codes: np.ndarray  # int8 in [-(2**(bits-1)-1), 2**(bits-1)-1], one per element

    @property
    def size(self) -> int:
        return int(self.codes.size)

    def dequantize(self) -> np.ndarray:
        """float32 values, flat."""
        return self.codes.astype(np.float32) * np.repeat(self.scales, self.chunk)[: self.size]


@dataclass(frozen=True)
class Sparse:
    """The non-zero elements of a tensor, by flat position."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int64, strictly increasing, in [0, prod(shape))
    values: "np.ndarray | Quantized"  # k values

    def values_f32(self) -> np.ndarray:
        if isinstance(self.values, Quantized):
            return self.values.dequantize()
        return self.values.astype(np.float32, copy=False)


Encoded = np.ndarray | Quantized | Sparse


def shape_of(tensor: Encoded) -> tuple[int, ...]:
    return tuple(tensor.shape)


def to_dense(tensor: Encoded) -> np.ndarray:
    """The float32 array a node's compressor meant: what the aggregator adds up."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False)
    if isinstance(tensor, Quantized):
        return tensor.dequantize().reshape(tensor.shape)
    dense = np.zeros(int(np.prod(tensor.shape)), dtype=np.float32)
    dense[tensor.indices] = tensor.values_f32()
    return dense.reshape(tensor.shape)


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
    """Exactly ``count`` unsigned LEB128 values filling ``data``, as int64."""
    raw = np.frombuffer(data, dtype=np.uint8)
    last = raw < 0x80  # the final byte of each varint
    if int(np.count_nonzero(last)) != count or (len(raw) and not last[-1]):
        raise SchemaError("bad_index", f"{field} does not hold exactly {count} varints")
    if len(raw) == count:  # every varint is one byte: the common case for small gaps
        return raw.astype(np.int64)
    index = np.arange(len(raw))
    begins = np.empty(len(raw), dtype=bool)  # first byte of a varint
    begins[0] = True
    begins[1:] = last[:-1]
    start_of = np.maximum.accumulate(np.where(begins, index, 0))
    position = index - start_of  # byte index within its varint
    if position.max() >= MAX_VARINT_BYTES:
        raise SchemaError("bad_index", f"{field} has a varint longer than {MAX_VARINT_BYTES} bytes")
    totals = np.cumsum((raw & 0x7F).astype(np.int64) << (7 * position))
    ends = np.flatnonzero(last)
    return np.diff(totals[ends], prepend=0)


# ------------------------------------------------------------------------ encoding


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    offset = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return offset.tobytes()
    if offset.size % 2:
        offset = np.append(offset, np.uint8(0))
    return (offset[0::2] | (offset[1::2] << 4)).astype(np.uint8).tobytes()


def encode_encoded(tensor: Encoded) -> dict[str, Any]:
    """The wire map of a dense, quantized or sparse tensor."""
    if isinstance(tensor, np.ndarray):
        return encode_tensor(tensor)
    if isinstance(tensor, Quantized):
        return {
            "enc": "quant",
            "shape": list(tensor.shape),
            "bits": tensor.bits,
            "chunk": tensor.chunk,
            "scales": np.asarray(tensor.scales, dtype="<f4").tobytes(),
            "data": _pack_codes(tensor.codes, tensor.bits),
        }
    gaps = np.diff(tensor.indices, prepend=0)
    values = encode_encoded(tensor.values)
    values.pop("enc", None)
    values.pop("shape")
    return {
        "enc": "sparse",
        "shape": list(tensor.shape),
        "count": int(tensor.indices.size),
        "index": encode_varints(gaps),
        **values,
    }


# ------------------------------------------------------------------------ decoding


def _shape(obj: Mapping[str, Any], field: str, max_elements: int) -> tuple[tuple[int, ...], int]:
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int for d in shape):
        raise SchemaError("bad_shape", f"{field}.shape must be a list of at most 8 sizes")
    count = 1
    for size in shape:
        if not 0 <= size <= max_elements:
            raise SchemaError("bad_shape", f"{field}.shape has size {size}")
        count *= size
        if count > max_elements:
            raise SchemaError("oversized", f"{field} has more than {max_elements} elements")
    return tuple(shape), count


def _int(obj: Mapping[str, Any], key: str, field: str) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise SchemaError("bad_field", f"{field}.{key} must be an integer")
    return value


def _bin(obj: Mapping[str, Any], key: str, field: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, bytes):
        raise SchemaError("bad_field", f"{field}.{key} must be bytes")
    return value


def _decode_quantized(
    obj: Mapping[str, Any], field: str, max_elements: int, flat: int | None = None
) -> Quantized:
    """A quantized tensor; with ``flat`` the k values inlined in a sparse map."""
    shape, count = _shape(obj, field, max_elements) if flat is None else ((flat,), flat)
    bits = _int(obj, "bits", field)
    chunk = _int(obj, "chunk", field)
    if bits not in QUANT_BITS:
        raise SchemaError("bad_field", f"{field}.bits is {bits}, not one of {QUANT_BITS}")
    if not 1 <= chunk <= 1 << 20:
        raise SchemaError("bad_field", f"{field}.chunk {chunk} is not in 1..{1 << 20}")
    chunks = -(-count // chunk)
    scales_raw = _bin(obj, "scales", field)
    if len(scales_raw) != 4 * chunks:
        raise SchemaError(
            "bad_shape", f"{field}.scales holds {len(scales_raw)} bytes, needs {4 * chunks}"
        )
    scales = np.frombuffer(scales_raw, dtype="<f4")
    if not np.isfinite(scales).all() or (scales < 0).any() or (scales > MAX_SCALE).any():
        raise SchemaError("non_finite", f"{field}.scales must be in [0, {MAX_SCALE:g}]")
    data = _bin(obj, "data", field)
    needed = count if bits == 8 else -(-count // 2)
    if len(data) != needed:
        raise SchemaError("bad_shape", f"{field}.data holds {len(data)} bytes, needs {needed}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 4:
        raw = np.stack((raw & 0x0F, raw >> 4), axis=1).reshape(-1)[:count]
    codes = (raw.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
    limit = (1 << (bits - 1)) - 1
    if count and (codes < -limit).any():
        raise SchemaError("bad_field", f"{field}.data has a code below -{limit}")
    return Quantized(shape=shape, bits=bits, chunk=chunk, scales=scales, codes=codes)


def _decode_values(obj: Mapping[str, Any], field: str, count: int) -> "np.ndarray | Quantized":
    """The k values inlined in a sparse map: quantized if it has ``bits``, else dense."""
    if "bits" in obj:
        return _decode_quantized(obj, field, count, flat=count)
    return decode_tensor({**obj, "shape": [count]}, field, max_elements=count)


def decode_encoded(obj: Any, field: str, *, max_elements: int) -> Encoded:
    """Check one wire tensor of any form. Values may still be non-finite (see
    ``non_finite_name``)."""
    if not isinstance(obj, Mapping):
        raise SchemaError("bad_field", f"{field} must be a map, got {type(obj).__name__}")
    enc = obj.get("enc", "dense")
    if enc == "dense":
        return decode_tensor(obj, field, max_elements=max_elements)
    if enc == "quant":
        return _decode_quantized(obj, field, max_elements)
    if enc != "sparse":
        raise SchemaError("bad_encoding", f"{field}.enc {enc!r} is not dense, quant or sparse")
    shape, size = _shape(obj, field, max_elements)
    count = _int(obj, "count", field)
    if not 0 <= count <= size:
        raise SchemaError("bad_index", f"{field}.count {count} is not in 0..{size}")
    gaps = decode_varints(_bin(obj, "index", field), count, f"{field}.index")
    if count > 1 and (gaps[1:] == 0).any():
        raise SchemaError("bad_index", f"{field}.index repeats a position")
    indices = np.cumsum(gaps)
    if count and indices[-1] >= size:
        raise SchemaError("bad_index", f"{field}.index points past the {size} elements")
    values = _decode_values(obj, field, count)
    return Sparse(shape=shape, indices=indices, values=values)


def value_problem(tensor: Encoded) -> str | None:
    """ "non_finite" if decoding gives NaN or Inf, "out_of_range" if some |value| exceeds
    MAX_ABS, else None. Quantized values are bounded by their checked scales already."""
    values = tensor.values if isinstance(tensor, Sparse) else tensor
    if isinstance(values, Quantized):
        return None
    flat = values.reshape(-1)
    if squared_norm(flat) <= MAX_ABS * MAX_ABS:  # False for NaN and Inf
        return None
    if not np.isfinite(flat).all():
        return "non_finite"
    if (np.abs(flat.astype(np.float32, copy=False)) > MAX_ABS).any():
        return "out_of_range"
    return None
