"""Elias-Fano coding of a strictly increasing run of positions (docs/PROTOCOL.md 12.9).

k positions below n cost about 2 + log2(n / k) bits each, close to the log2(C(n, k)) / k
bits any code needs for positions chosen at random, and both halves decode with a few
whole-array numpy calls (no per-element loop, unlike varints or Golomb-Rice codes whose
lengths chain from one element to the next):

- ``lower``: the low ``low_bits`` bits of every position, packed one after another;
- ``upper``: a bitmap with one set bit per position, at ``(p >> low_bits) + j`` for the
  j-th position; the high part of position j is the number of clear bits before its set bit.

Bits are numbered from the least significant bit of each byte, as in the 1-bit codes of
``schemas.encodings``. Decoding checks every length, count and order and raises
``SchemaError`` with the reason ``bad_index``.
"""

from typing import NamedTuple

import numpy as np

from fedmq.schemas.errors import SchemaError

MAX_LOW_BITS = 40  # positions stay far below 2**40 (models are limited to 2**25 elements)


class EliasFano(NamedTuple):
    low_bits: int
    upper: bytes
    lower: bytes


def best_low_bits(positions: np.ndarray, size: int) -> int:
    """The split with the fewest bytes: floor(log2(n / k)) is optimal for positions spread
    evenly; real deltas cluster, so its neighbours are tried too (the decoder takes any)."""
    count = positions.size
    if not count:
        return 0
    guess = max(0, (size // count).bit_length() - 1)
    last = int(positions[-1])

    def length(low: int) -> int:
        return -(-count * low // 8) + -(-((last >> low) + count) // 8)

    return min(range(max(0, guess - 1), min(MAX_LOW_BITS, guess + 1) + 1), key=length)


def encode_positions(positions: np.ndarray, size: int) -> EliasFano:
    """Strictly increasing int64 ``positions`` in [0, size)."""
    count = positions.size
    if not count:
        return EliasFano(0, b"", b"")
    positions = positions.astype(np.int64, copy=False)
    low_bits = best_low_bits(positions, size)
    bitmap = np.zeros(int(positions[-1] >> low_bits) + count, dtype=np.uint8)
    bitmap[(positions >> low_bits) + np.arange(count)] = 1
    upper = np.packbits(bitmap, bitorder="little").tobytes()
    if not low_bits:
        return EliasFano(0, upper, b"")
    shifts = np.arange(low_bits, dtype=np.int64)
    low = ((positions[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return EliasFano(low_bits, upper, np.packbits(low, bitorder="little").tobytes())


def decode_positions(code: EliasFano, count: int, size: int, field: str) -> np.ndarray:
    """The ``count`` positions ``code`` holds, int64, strictly increasing and below ``size``."""
    low_bits, upper, lower = code
    if type(low_bits) is not int or not 0 <= low_bits <= MAX_LOW_BITS:
        raise SchemaError("bad_index", f"{field}.low is not an int in 0..{MAX_LOW_BITS}")
    needed = -(-count * low_bits // 8)
    if len(lower) != needed:
        raise SchemaError("bad_index", f"{field}.lower holds {len(lower)} bytes, needs {needed}")
    if not count:
        if upper:
            raise SchemaError("bad_index", f"{field}.upper must be empty when count is 0")
        return np.zeros(0, dtype=np.int64)
    # The last set bit lies at (p_last >> low_bits) + count - 1 with p_last < size: bound
    # the bitmap before unpacking it, so no payload makes us unpack more than a model's worth.
    longest = -(-(((size - 1) >> low_bits) + count) // 8) if size else 0
    if not upper or len(upper) > longest or upper[-1] == 0:
        raise SchemaError(
            "bad_index",
            f"{field}.upper holds {len(upper)} bytes, needs 1..{longest} ending in a set bit",
        )
    bitmap = np.unpackbits(np.frombuffer(upper, np.uint8), bitorder="little")
    ones = bitmap.view(bool).nonzero()[0]
    if ones.size != count:
        raise SchemaError("bad_index", f"{field}.upper has {ones.size} set bits, count is {count}")
    positions = ones - np.arange(count)  # high parts, non-decreasing by construction
    if low_bits:
        positions <<= low_bits
        positions |= _unpack_fixed(lower, count, low_bits)
    if count > 1 and (positions[1:] <= positions[:-1]).any():
        raise SchemaError("bad_index", f"{field} repeats a position")
    if positions[-1] >= size:
        raise SchemaError("bad_index", f"{field} points past the {size} elements")
    return positions


def _unpack_fixed(data: bytes, count: int, width: int) -> np.ndarray:
    """``count`` unsigned ``width``-bit fields packed LSB first, as int64 (``width`` >= 1).

    Each read is an unaligned little-endian uint64 straight from the bytes (a strided
    view, no copy): up to 8 bits wide, eight fields fill ``width`` whole bytes, so one
    word per group of eight is shifted eight ways; wider fields (rare: k < n / 256) read
    one word each at their first byte."""
    buffer = np.frombuffer(data + bytes(8), np.uint8)
    mask = np.uint64((1 << width) - 1)
    if width <= 8:
        groups = -(-count // 8)
        words = np.ndarray((groups, 1), "<u8", buffer=buffer, strides=(width, 8))
        fields = words >> np.arange(0, 8 * width, width, dtype=np.uint64)
        fields &= mask
        return fields.reshape(-1)[:count].view(np.int64)
    starts = np.arange(count, dtype=np.int64) * width
    words = np.ndarray((len(data) + 1,), "<u8", buffer=buffer, strides=(1,))
    fields = words[starts >> 3] >> (starts & 7).astype(np.uint64)
    fields &= mask
    return fields.view(np.int64)
