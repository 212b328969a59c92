"""The dense form: a plain numpy array, float32 or float16 (``schemas.tensors``' map
``{"dtype", "shape", "data"}``, no ``"enc"``). float16 is how ``fp16`` travels."""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq.schemas.encodings.base import MAX_ABS, Reader
from fedmq.schemas.tensors import decode_tensor, encode_tensor, squared_norm


@functools.cache
def _float16_table() -> np.ndarray:
    """float32 value of every float16 bit pattern (256 KiB, built on first use)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def float16_into(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 ``values`` (flat) as float32 into ``out``: exactly ``astype``, but a table
    look-up, several times faster than numpy's element-by-element float16 cast."""
    return np.take(_float16_table(), values.view(np.uint16), out=out, mode="clip")


def values_f32(values: np.ndarray) -> np.ndarray:
    """Flat float32 of dense ``values`` (float16 through the table; float32 as it is)."""
    flat = values.reshape(-1)
    if flat.dtype == np.float16:
        return float16_into(flat, np.empty(flat.size, dtype=np.float32))
    return flat.astype(np.float32, copy=False)


def _f16_magnitude_bits(flat: np.ndarray) -> int:
    """Largest sign-less bit pattern of float16 values: 0x7C00 and above are Inf and NaN."""
    return int(np.bitwise_and(flat.view(np.uint16), 0x7FFF).max())


def dense_value_problem(values: np.ndarray) -> str | None:
    """What ``Encoding.value_problem`` says of dense values (also a sparse tensor's)."""
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


class Dense:
    tag = "dense"
    kind = np.ndarray

    def decode(self, obj: Mapping[str, Any], field: str, *, max_elements: int) -> np.ndarray:
        return decode_tensor(obj, field, max_elements=max_elements)

    def encode(self, tensor: np.ndarray) -> dict[str, Any]:
        return encode_tensor(tensor)

    def shape(self, tensor: np.ndarray) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def to_dense(self, tensor: np.ndarray) -> np.ndarray:
        return tensor.astype(np.float32, copy=False)

    def values(self, tensor: np.ndarray) -> np.ndarray:
        return values_f32(tensor)

    def value_problem(self, tensor: np.ndarray) -> str | None:
        return dense_value_problem(tensor)

    def add_scaled_into(
        self, tensor: np.ndarray, total: np.ndarray, scale: np.float32, scratch: np.ndarray
    ) -> None:
        flat = tensor.reshape(-1)
        step = scratch.size
        for start in range(0, total.size, step):
            stop = min(start + step, total.size)
            scaled = scratch[: stop - start]
            if flat.dtype == np.float16:
                np.multiply(float16_into(flat[start:stop], scaled), scale, out=scaled)
            else:
                np.multiply(flat[start:stop], scale, out=scaled)
            window = total[start:stop]
            np.add(window, scaled, out=window)

    def scaled(self, tensor: np.ndarray, scale: np.float32) -> np.ndarray:
        return tensor.astype(np.float32) * scale

    def reader(self, tensor: np.ndarray) -> Reader:
        flat = tensor.reshape(-1)

        def read(start: int, stop: int, out: np.ndarray) -> None:
            out[:] = flat[start:stop]

        return read

    def map_values(self, tensor: np.ndarray, fn: Callable[[np.ndarray], Any]) -> Any:
        return fn(tensor)


DENSE = Dense()
