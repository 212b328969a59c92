"""Tensors on the wire in their compressed forms, and their exact decoding.

A tensor map without ``"enc"`` is dense (``dense``, ``schemas.tensors``); ``"quant"`` is
quantized (``quantized``), ``"sparse"`` sparse (``sparse``). Each form is one module with
an object following ``base.Encoding``, registered below by its wire tag: a new form is a
new module and one more ``register`` line. Callers dispatch through ``encoding_of``
(the decoded form's encoding) or the functions below, never on the form's type.

Decoders check every length, range and ordering and raise ``SchemaError``; they return
light objects (views on the payload, no densifying), so the aggregator can fold a sparse
update into its sum in O(k).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmq.schemas.encodings.base import (
    MAX_ABS,
    MAX_SCALE,
    Encoding,
    Reader,
    WholeDelta,
    by_tag,
    encoding_of,
    register,
    tags,
)
from fedmq.schemas.encodings.dense import DENSE, float16_into
from fedmq.schemas.encodings.quantized import (
    QUANT_BITS,
    QUANTIZED,
    Quantized,
    decode_bits_and_chunk,
    decode_codes,
    decode_scales,
)
from fedmq.schemas.encodings.sparse import (
    MAX_VARINT_BYTES,
    SPARSE,
    Sparse,
    decode_varints,
    encode_varints,
)
from fedmq.schemas.errors import SchemaError

register(DENSE)
register(QUANTIZED)
register(SPARSE)

Encoded = np.ndarray | Quantized | Sparse


def decode_encoded(obj: Any, field: str, *, max_elements: int) -> Encoded:
    """Check one wire tensor of any form. Values may still be non-finite (see
    ``value_problem``)."""
    if not isinstance(obj, Mapping):
        raise SchemaError("bad_field", f"{field} must be a map, got {type(obj).__name__}")
    enc = obj.get("enc", "dense")
    encoding = by_tag(enc)
    if encoding is None:
        *others, last = tags()
        raise SchemaError(
            "bad_encoding", f"{field}.enc {enc!r} is not {', '.join(others)} or {last}"
        )
    decoded: Encoded = encoding.decode(obj, field, max_elements=max_elements)
    return decoded


def encode_encoded(tensor: Encoded) -> dict[str, Any]:
    """The wire map of a tensor in any registered form."""
    return encoding_of(tensor).encode(tensor)


def shape_of(tensor: Encoded) -> tuple[int, ...]:
    return tuple(tensor.shape)


def to_dense(tensor: Encoded) -> np.ndarray:
    """The float32 array a node's compressor meant: what the aggregator adds up."""
    return encoding_of(tensor).to_dense(tensor)


def value_problem(tensor: Encoded) -> str | None:
    """ "non_finite" if decoding gives NaN or Inf, "out_of_range" if some |value| exceeds
    MAX_ABS, else None. Quantized values are bounded by their checked scales already."""
    return encoding_of(tensor).value_problem(tensor)


__all__ = [
    "MAX_ABS",
    "MAX_SCALE",
    "MAX_VARINT_BYTES",
    "QUANT_BITS",
    "Encoded",
    "Encoding",
    "Quantized",
    "Reader",
    "Sparse",
    "WholeDelta",
    "by_tag",
    "decode_bits_and_chunk",
    "decode_codes",
    "decode_encoded",
    "decode_scales",
    "decode_varints",
    "encode_encoded",
    "encode_varints",
    "encoding_of",
    "float16_into",
    "register",
    "shape_of",
    "tags",
    "to_dense",
    "value_problem",
]
