"""numpy arrays on the wire: ``{"dtype": "<f4", "shape": [..], "data": <raw bytes>}``.

Byte order is explicit in the dtype string so a big-endian reader decodes correctly.
Decoding returns a read-only view on the payload (no copy) after checking every field.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmq.schemas.errors import SchemaError

# dtypes a parameter tensor may have on the wire, by their numpy string.
WIRE_DTYPES: dict[str, np.dtype] = {"<f4": np.dtype("<f4"), "<f2": np.dtype("<f2")}
MAX_RANK = 8

# A model's parameters as numpy arrays named as on the wire ("dense0.w"), and their shapes.
Params = dict[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """The wire form of one array (little-endian, C order)."""
    dtype = array.dtype.newbyteorder("<")
    if dtype.str not in WIRE_DTYPES:
        raise ValueError(f"dtype {array.dtype} cannot travel; use one of {sorted(WIRE_DTYPES)}")
    contiguous = np.asarray(array, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
    return {"dtype": dtype.str, "shape": list(contiguous.shape), "data": contiguous.tobytes()}


def decode_tensor(obj: Any, field: str, *, max_elements: int) -> np.ndarray:
    """Check one wire tensor and return it as a read-only array (values may be non-finite)."""
    if not isinstance(obj, Mapping):
        raise SchemaError("bad_field", f"{field} must be a map, got {type(obj).__name__}")
    dtype_name = obj.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise SchemaError(
            "bad_dtype", f"{field}.dtype {dtype_name!r} is not one of {sorted(WIRE_DTYPES)}"
        )
    shape = obj.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise SchemaError(
            "bad_shape", f"{field}.shape must be a list of at most {MAX_RANK} sizes >= 0"
        )
    count = 1
    for size in shape:
        count *= size
        if size > max_elements or count > max_elements:
            raise SchemaError(
                "oversized", f"{field} has more than the allowed {max_elements} elements"
            )
    if count > max_elements:  # a scalar (shape []) when no element is left
        raise SchemaError("oversized", f"{field} has more than the allowed {max_elements} elements")
    data = obj.get("data")
    if not isinstance(data, bytes):
        raise SchemaError("bad_field", f"{field}.data must be bytes")
    dtype = WIRE_DTYPES[dtype_name]
    if len(data) != count * dtype.itemsize:
        raise SchemaError(
            "bad_shape",
            f"{field}.data holds {len(data)} bytes, shape {shape} of {dtype_name} needs "
            f"{count * dtype.itemsize}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def squared_norm(flat: np.ndarray) -> float:
    """``dot(x, x)`` in one BLAS pass: finite and small means every value is finite and
    small; NaN, Inf or overflow send the caller to an exact (rarer, dearer) check."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(flat, flat))


def all_finite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Name of the first array holding NaN or Inf, or None if all are finite."""
    for name, array in arrays.items():
        flat = array.reshape(-1)
        if not math.isfinite(squared_norm(flat)) and not np.isfinite(flat).all():
            return name
    return None
