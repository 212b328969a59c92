"""Compressed tensors on the wire: quantized and sparse forms, and their exact decoding.

A tensor map without ``"enc"`` is dense (``schemas.tensors``). Two more forms exist:

- ``{"enc": "quant", "shape", "bits": 8|4|1, "chunk", "scales": bin <f4, "data": bin}``:
  value = code * scales[i // chunk]; codes are signed, stored offset by 2**(bits-1)
  (8 bits: one byte each; 4 bits: two per byte, the first element in the low nibble);
  1 bit: code +1 (bit set) or -1 (clear), eight per byte, the first in the lowest bit.
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

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.schemas.errors import SchemaError
from fedmq.schemas.tensors import decode_tensor, encode_tensor, squared_norm

QUANT_BITS = (8, 4, 1)
# Largest magnitude a delta value may have. Weighted by up to 2**24 examples in float32
# and summed over a round in float64 it stays finite with room to spare, so one accepted
# update can never turn the global model into Inf. Real deltas are many orders smaller.
MAX_ABS = 1e15
MAX_SCALE = MAX_ABS / 127  # |code| <= 127
_MAX_SCALE_BITS = int(np.float32(MAX_SCALE).view(np.uint32))
MAX_VARINT_BYTES = 5  # positions < 2**35, far above any tensor we accept
# The eight 1-bit codes (bit set: +1, clear: -1) of each byte value, lowest bit first,
# as one int64 per byte.
_SIGN_OCTETS = (
    np.array([[1 if b >> i & 1 else -1 for i in range(8)] for b in range(256)], dtype=np.int8)
    .view(np.int64)
    .reshape(-1)
)
# The two signed 4-bit codes of each byte value, low nibble first (stored offset by 8),
# as one int16 per byte so that unpacking is a single np.take.
_NIBBLE_PAIRS = (
    np.array([[(b & 0x0F) - 8, (b >> 4) - 8] for b in range(256)], dtype=np.int8)
    .view(np.int16)
    .reshape(-1)
)


@dataclass(frozen=True)
class Quantized:
    """Uniform symmetric quantization of a flat run of numbers, one scale per chunk."""

    shape: tuple[int, ...]
    bits: int
    chunk: int
    scales: np.ndarray  # float32, one per chunk
    codes: np.ndarray  # int8 in [-(2**(bits-1)-1), 2**(bits-1)-1] (1 bit: -1 or +1), one each

    @property
    def size(self) -> int:
        return int(self.codes.size)

    def dequantize(self) -> np.ndarray:
        """float32 values, flat."""
        return self.dequantize_into(np.empty(self.size, dtype=np.float32))

    def dequantize_into(self, out: np.ndarray, start: int = 0) -> np.ndarray:
        """Values ``start .. start + out.size`` into float32 ``out``: one multiplication
        per run of whole chunks (int8 codes times float32 scales, cast in the loop), no
        repeated scales and no intermediate array."""
        stop = start + out.size
        chunk, codes, scales = self.chunk, self.codes, self.scales
        edge = min(stop, -(-start // chunk) * chunk)  # first chunk boundary at or after start
        whole = (stop - edge) // chunk
        tail = edge + whole * chunk
        if edge > start:
            np.multiply(codes[start:edge], scales[start // chunk], out=out[: edge - start])
        if whole:
            first = edge // chunk
            np.multiply(
                codes[edge:tail].reshape(whole, chunk),
                scales[first : first + whole, None],
                out=out[edge - start : tail - start].reshape(whole, chunk),
            )
        if tail < stop:
            np.multiply(codes[tail:stop], scales[tail // chunk], out=out[tail - start :])
        return out


@dataclass(frozen=True)
class Sparse:
    """The non-zero elements of a tensor, by flat position."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int64, strictly increasing, in [0, prod(shape))
    values: "np.ndarray | Quantized"  # k values

    def values_f32(self) -> np.ndarray:
        if isinstance(self.values, Quantized):
            return self.values.dequantize()
        if self.values.dtype == np.float16:
            return float16_into(self.values, np.empty(self.values.size, dtype=np.float32))
        return self.values.astype(np.float32, copy=False)


Encoded = np.ndarray | Quantized | Sparse


@functools.cache
def _float16_table() -> np.ndarray:
    """float32 value of every float16 bit pattern (256 KiB, built on first use)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def float16_into(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 ``values`` (flat) as float32 into ``out``: exactly ``astype``, but a table
    look-up, several times faster than numpy's element-by-element float16 cast."""
    return np.take(_float16_table(), values.view(np.uint16), out=out, mode="clip")


def shape_of(tensor: Encoded) -> tuple[int, ...]:
    return tuple(tensor.shape)


def to_dense(tensor: Encoded) -> np.ndarray:
    """The float32 array a node's compressor meant: what the aggregator adds up."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False)
    if isinstance(tensor, Quantized):
        return tensor.dequantize().reshape(tensor.shape)
    dense = np.zeros(math.prod(tensor.shape), dtype=np.float32)
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


# ------------------------------------------------------------------------ encoding


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    if bits == 1:  # bit set for +1, first element in the lowest bit
        return np.packbits(codes > 0, bitorder="little").tobytes()
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
    bits, chunk = decode_bits_and_chunk(obj, field)
    scales = decode_scales(_bin(obj, "scales", field), -(-count // chunk), field)
    codes = decode_codes(_bin(obj, "data", field), bits, count, field)
    return Quantized(shape=shape, bits=bits, chunk=chunk, scales=scales, codes=codes)


def decode_bits_and_chunk(obj: Mapping[str, Any], field: str) -> tuple[int, int]:
    """``bits`` (8, 4 or 1) and ``chunk`` (1..2**20) of quantized values: both must be
    ints before either is range-checked."""
    bits, chunk = _int(obj, "bits", field), _int(obj, "chunk", field)
    if bits not in QUANT_BITS:
        raise SchemaError("bad_field", f"{field}.bits is {bits}, not one of {QUANT_BITS}")
    if not 1 <= chunk <= 1 << 20:
        raise SchemaError("bad_field", f"{field}.chunk {chunk} is not in 1..{1 << 20}")
    return bits, chunk


def decode_scales(raw: bytes, chunks: int, field: str) -> np.ndarray:
    """``chunks`` float32 scales, each finite and in [0, MAX_SCALE]."""
    if len(raw) != 4 * chunks:
        raise SchemaError("bad_shape", f"{field}.scales holds {len(raw)} bytes, needs {4 * chunks}")
    scales = np.frombuffer(raw, dtype="<f4")
    # One reduction in the usual case: as uint32, the bits of floats in [+0, MAX_SCALE]
    # are ordered like the floats, and negatives, -0.0, Inf and NaN all lie above them;
    # only then the exact comparison (-0.0 passes, NaN fails).
    if (
        chunks
        and scales.view("<u4").max() > _MAX_SCALE_BITS
        and not (scales.min() >= 0 and scales.max() <= MAX_SCALE)
    ):
        raise SchemaError("non_finite", f"{field}.scales must be in [0, {MAX_SCALE:g}]")
    return scales


def decode_codes(data: bytes, bits: int, count: int, field: str) -> np.ndarray:
    """``count`` signed codes of ``bits`` (8, 4 or 1) packed in ``data``, as int8."""
    needed = -(-count * bits // 8)
    if len(data) != needed:
        raise SchemaError("bad_shape", f"{field}.data holds {len(data)} bytes, needs {needed}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 1:  # every bit pattern is valid: +1 or -1
        return np.take(_SIGN_OCTETS, raw).view(np.int8)[:count]
    if bits == 8:
        codes = (raw ^ 0x80).view(np.int8)  # stored c + 128: flipping the top bit gives c
    else:
        codes = np.take(_NIBBLE_PAIRS, raw).view(np.int8)[:count]
    limit = (1 << (bits - 1)) - 1
    if count and codes.min() < -limit:
        raise SchemaError("bad_field", f"{field}.data has a code below -{limit}")
    return codes


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
    if count > 1 and gaps[1:].min() == 0:
        raise SchemaError("bad_index", f"{field}.index repeats a position")
    indices = gaps.cumsum()
    if count and indices[-1] >= size:
        raise SchemaError("bad_index", f"{field}.index points past the {size} elements")
    values = _decode_values(obj, field, count)
    return Sparse(shape=shape, indices=indices, values=values)


def _f16_magnitude_bits(flat: np.ndarray) -> int:
    """Largest sign-less bit pattern of float16 values: 0x7C00 and above are Inf and NaN."""
    return int(np.bitwise_and(flat.view(np.uint16), 0x7FFF).max())


def value_problem(tensor: Encoded) -> str | None:
    """ "non_finite" if decoding gives NaN or Inf, "out_of_range" if some |value| exceeds
    MAX_ABS, else None. Quantized values are bounded by their checked scales already."""
    values = tensor.values if isinstance(tensor, Sparse) else tensor
    if isinstance(values, Quantized):
        return None
    flat = values.reshape(-1)
    if flat.dtype == np.float16:  # finite float16 never exceeds 65,504: check exponent bits
        return "non_finite" if flat.size and _f16_magnitude_bits(flat) >= 0x7C00 else None
    if squared_norm(flat) <= MAX_ABS * MAX_ABS:  # False for NaN and Inf
        return None
    if not np.isfinite(flat).all():
        return "non_finite"
    if (np.abs(flat.astype(np.float32, copy=False)) > MAX_ABS).any():
        return "out_of_range"
    return None
