"""The quantized form: uniform symmetric quantization, one scale per chunk.

``{"enc": "quant", "shape", "bits": 8|4|1, "chunk", "scales": bin <f4, "data": bin}``:
value = code * scales[i // chunk]; codes are signed, stored offset by 2**(bits-1)
(8 bits: one byte each; 4 bits: two per byte, the first element in the low nibble);
1 bit: code +1 (bit set) or -1 (clear), eight per byte, the first in the lowest bit.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmq.schemas.encodings.base import MAX_SCALE, Reader, wire_bin, wire_int, wire_shape
from fedmq.schemas.errors import SchemaError

QUANT_BITS = (8, 4, 1)
_MAX_SCALE_BITS = int(np.float32(MAX_SCALE).view(np.uint32))
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


# ------------------------------------------------------------------------ encoding


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    if bits == 1:  # bit set for +1, first element in the lowest bit
        return np.packbits(codes > 0, bitorder="little").tobytes()
    offset = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return offset.tobytes()
    if offset.size % 2:
        offset = np.append(offset, np.uint8(0))
    return (offset[0::2] | (offset[1::2] << 4)).astype(np.uint8).tobytes()


# ------------------------------------------------------------------------ decoding


def decode_quantized(
    obj: Mapping[str, Any], field: str, max_elements: int, flat: int | None = None
) -> Quantized:
    """A quantized tensor; with ``flat`` the k values inlined in a sparse map."""
    shape, count = wire_shape(obj, field, max_elements) if flat is None else ((flat,), flat)
    bits, chunk = decode_bits_and_chunk(obj, field)
    scales = decode_scales(wire_bin(obj, "scales", field), -(-count // chunk), field)
    codes = decode_codes(wire_bin(obj, "data", field), bits, count, field)
    return Quantized(shape=shape, bits=bits, chunk=chunk, scales=scales, codes=codes)


def decode_bits_and_chunk(obj: Mapping[str, Any], field: str) -> tuple[int, int]:
    """``bits`` (8, 4 or 1) and ``chunk`` (1..2**20) of quantized values: both must be
    ints before either is range-checked."""
    bits, chunk = wire_int(obj, "bits", field), wire_int(obj, "chunk", field)
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


class QuantizedEncoding:
    tag = "quant"
    kind = Quantized

    def decode(self, obj: Mapping[str, Any], field: str, *, max_elements: int) -> Quantized:
        return decode_quantized(obj, field, max_elements)

    def encode(self, tensor: Quantized) -> dict[str, Any]:
        return {
            "enc": "quant",
            "shape": list(tensor.shape),
            "bits": tensor.bits,
            "chunk": tensor.chunk,
            "scales": np.asarray(tensor.scales, dtype="<f4").tobytes(),
            "data": pack_codes(tensor.codes, tensor.bits),
        }

    def shape(self, tensor: Quantized) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def to_dense(self, tensor: Quantized) -> np.ndarray:
        return tensor.dequantize().reshape(tensor.shape)

    def values(self, tensor: Quantized) -> np.ndarray:
        return tensor.dequantize()

    def value_problem(self, tensor: Quantized) -> str | None:
        return None  # bounded by the checked scales already

    def add_scaled_into(
        self, tensor: Quantized, total: np.ndarray, scale: np.float32, scratch: np.ndarray
    ) -> None:
        step = scratch.size
        for start in range(0, total.size, step):
            stop = min(start + step, total.size)
            scaled = scratch[: stop - start]
            np.multiply(tensor.dequantize_into(scaled, start), scale, out=scaled)
            window = total[start:stop]
            np.add(window, scaled, out=window)

    def scaled(self, tensor: Quantized, scale: np.float32) -> Quantized:
        return replace(tensor, scales=tensor.scales * scale)

    def reader(self, tensor: Quantized) -> Reader:
        def read(start: int, stop: int, out: np.ndarray) -> None:
            tensor.dequantize_into(out, start)

        return read

    def map_values(self, tensor: Quantized, fn: Callable[[np.ndarray], Any]) -> Any:
        raise TypeError("values are already coded")


QUANTIZED = QuantizedEncoding()
