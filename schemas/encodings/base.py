"""The protocol every tensor encoding follows, and the registry that finds one.

An encoding is one module (``dense``, ``quantized``, ``sparse``) holding its decoded form
and an object that follows ``Encoding``: how the form is read from its wire map (strictly,
``SchemaError`` naming the field), written back, and used by the aggregator without
densifying (added into a running sum, scaled, read window by window). Encodings are
registered by their wire tag (``"enc"``) and by the Python type of their decoded form, so
that callers dispatch with one look-up instead of a chain of ``isinstance``: a new
encoding is one new module plus one ``register`` line in ``schemas/encodings/__init__.py``.
"""

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from fedmq.schemas.errors import SchemaError

# Largest magnitude a delta value may have. Weighted by up to 2**24 examples in float32
# and summed over a round in float64 it stays finite with room to spare, so one accepted
# update can never turn the global model into Inf. Real deltas are many orders smaller.
MAX_ABS = 1e15
MAX_SCALE = MAX_ABS / 127  # |code| <= 127

# ``read(start, stop, out)``: flat elements [start, stop) of one tensor into float32 ``out``.
Reader = Callable[[int, int, np.ndarray], None]


class Encoding(Protocol):
    """One tensor form on the wire. Methods take the decoded form as their first argument
    (dense tensors are plain numpy arrays, which cannot carry methods of their own)."""

    @property
    def tag(self) -> str:
        """The wire map's ``"enc"`` (``"dense"``: no ``"enc"`` key)."""
        ...

    @property
    def kind(self) -> type:
        """The Python type of the decoded form."""
        ...

    def decode(self, obj: Mapping[str, Any], field: str, *, max_elements: int) -> Any:
        """The checked form of wire map ``obj``; at most ``max_elements`` elements (the
        size bound, checked on the shape before any data is looked at)."""
        ...

    def encode(self, tensor: Any) -> dict[str, Any]:
        """The wire map of ``tensor``."""
        ...

    def shape(self, tensor: Any) -> tuple[int, ...]:
        """The full tensor's shape (for a sparse tensor: not the number of values)."""
        ...

    def to_dense(self, tensor: Any) -> np.ndarray:
        """The float32 array the node's compressor meant."""
        ...

    def values(self, tensor: Any) -> np.ndarray:
        """The values it sends, flat, float32 (a sparse tensor's: only the kept ones)."""
        ...

    def value_problem(self, tensor: Any) -> str | None:
        """``"non_finite"``, ``"out_of_range"`` (beyond MAX_ABS) or None."""
        ...

    def add_scaled_into(
        self, tensor: Any, total: np.ndarray, scale: np.float32, scratch: np.ndarray
    ) -> None:
        """``total += scale * tensor``: ``total`` flat float64, each product rounded once to
        float32; ``scratch`` is float32 work space the caller owns (any size >= 1)."""
        ...

    def scaled(self, tensor: Any, scale: np.float32) -> Any:
        """``tensor * scale`` in the same form, each number rounded once to float32."""
        ...

    def reader(self, tensor: Any) -> Reader:
        """A window reader over the flat tensor (prepared once, called many times)."""
        ...

    def map_values(self, tensor: Any, fn: Callable[[np.ndarray], Any]) -> Any:
        """``fn`` applied to the dense values it holds (a sparse tensor's kept values);
        TypeError if they are already coded."""
        ...


class WholeDelta(Protocol):
    """A whole delta decoded as one run over the model's parameters laid end to end (the
    ``flat`` form): the aggregator adds it to its flat sum in one step."""

    layout: tuple[tuple[str, tuple[int, ...]], ...]

    def add_scaled_into(self, total: np.ndarray, scale: np.float32) -> None: ...

    def form_sample(self) -> tuple[str, Any]:
        """The first tensor, by name: every tensor of a whole delta is in its form (dense
        of one dtype, or sparse with values of one kind), so checking it checks all."""
        ...


_BY_TAG: dict[str, Encoding] = {}
_BY_KIND: dict[type, Encoding] = {}


def register(encoding: Encoding) -> Encoding:
    """Make ``encoding`` known by its wire tag and by its decoded type."""
    if encoding.tag in _BY_TAG or encoding.kind in _BY_KIND:
        raise ValueError(f"encoding {encoding.tag!r} is registered twice")
    _BY_TAG[encoding.tag] = encoding
    _BY_KIND[encoding.kind] = encoding
    return encoding


def unregister(encoding: Encoding) -> None:
    """Forget ``encoding`` (tests that register one of their own)."""
    del _BY_TAG[encoding.tag], _BY_KIND[encoding.kind]


def tags() -> tuple[str, ...]:
    return tuple(_BY_TAG)


def by_tag(tag: Any) -> Encoding | None:
    return _BY_TAG.get(tag) if isinstance(tag, str) else None


def encoding_of(tensor: Any) -> Encoding:
    """The encoding whose decoded form ``tensor`` is."""
    found = _BY_KIND.get(type(tensor))
    if found is not None:
        return found
    for kind, encoding in _BY_KIND.items():  # subclasses (an ndarray subclass, say)
        if isinstance(tensor, kind):
            return encoding
    raise TypeError(f"not an encoded tensor: {type(tensor).__name__}")


# ------------------------------------------------------------------------ wire helpers


def wire_shape(
    obj: Mapping[str, Any], field: str, max_elements: int
) -> tuple[tuple[int, ...], int]:
    """``shape`` (at most 8 sizes) and its element count, at most ``max_elements``."""
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


def wire_int(obj: Mapping[str, Any], key: str, field: str) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise SchemaError("bad_field", f"{field}.{key} must be an integer")
    return value


def wire_bin(obj: Mapping[str, Any], key: str, field: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, bytes):
        raise SchemaError("bad_field", f"{field}.{key} must be bytes")
    return value
