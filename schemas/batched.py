"""All sparse-quantized tensors of one update decoded in one pass (same wire format).

At 100x compression an update holds a few thousand numbers spread over a handful of
tensors, and decoding them one by one costs a dozen numpy calls per tensor: fixed
overhead that outweighs the numbers. Here the index, scale and code bytes of all
tensors are joined and decoded with one call each, positions land directly in the
model's flat layout (tensors one after the other, in layout order), and the result is a
``FlatSparse`` (``schemas.flat``), a read-only mapping that the aggregator folds into its
sum with a single scatter-add and that yields the per-tensor ``Sparse`` objects on demand.

The batch path only accepts what the per-tensor decoder (``decode_encoded``) accepts,
and gives the same numbers; when anything is off it returns None and the caller decodes
tensor by tensor, which names the problem. So the wire format and every error message
stay those of ``schemas.encodings``.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmq.schemas.encodings.quantized import (
    _NIBBLE_PAIRS,
    _SIGN_OCTETS,
    QUANT_BITS,
    decode_scales,
)
from fedmq.schemas.encodings.sparse import decode_varints
from fedmq.schemas.errors import SchemaError
from fedmq.schemas.flat import FlatSparse

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
