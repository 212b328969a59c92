"""The tensor encodings behind one protocol (schemas/encodings/): every registered form
keeps the protocol's promises, and a new form is one module plus its registration, with
no edit to the decoder, the aggregator's sum or its robust rules."""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedmq.aggregator.fedavg import WeightedSum
from fedmq.aggregator.robust import aggregate, parse_rule, scaled, update_norm
from fedmq.compression.transforms import quantize_values, sign_values
from fedmq.schemas import NodeUpdate, SchemaError, decode_update, encode
from fedmq.schemas.encodings import (
    Quantized,
    Sparse,
    by_tag,
    decode_encoded,
    encoding_of,
    register,
    tags,
    to_dense,
)
from fedmq.schemas.encodings.base import Reader, unregister, wire_shape

RNG = np.random.default_rng(3)
X = RNG.standard_normal((5, 7)).astype(np.float32)
KEPT = np.array([0, 3, 4, 17, 34], np.int64)

SAMPLES: dict[str, Any] = {
    "dense f4": X,
    "dense f2": X.astype(np.float16),
    "quant 8": quantize_values(X, 8, 4, np.random.default_rng(0)),
    "quant 4": quantize_values(X, 4, 3, np.random.default_rng(0)),
    "quant 1": sign_values(X, 6),
    "sparse f4": Sparse((5, 7), KEPT, X.reshape(-1)[KEPT]),
    "sparse f2": Sparse((5, 7), KEPT, X.reshape(-1)[KEPT].astype(np.float16)),
    "sparse quant": Sparse((5, 7), KEPT, quantize_values(X.reshape(-1)[KEPT], 8, 2, RNG)),
    "sparse sign": Sparse((5, 7), KEPT, sign_values(X.reshape(-1)[KEPT], 2)),
}


def test_the_registered_forms_are_dense_quant_and_sparse():
    assert tags() == ("dense", "quant", "sparse")
    assert [encoding_of(SAMPLES[k]).tag for k in ("dense f2", "quant 1", "sparse f4")] == list(
        tags()
    )
    with pytest.raises(SchemaError, match="is not dense, quant or sparse"):
        decode_encoded({"enc": "rle", "shape": [1]}, "t", max_elements=10)


@pytest.mark.parametrize("name", SAMPLES)
def test_every_form_keeps_the_protocol(name):
    tensor = SAMPLES[name]
    encoding = encoding_of(tensor)
    dense = to_dense(tensor)
    assert dense.dtype == np.float32 and dense.shape == encoding.shape(tensor) == (5, 7)
    # wire round trip, strict decoder of the form's own tag
    wire = encoding.encode(tensor)
    assert by_tag(wire.get("enc", "dense")) is encoding
    back = decode_encoded(wire, "t", max_elements=35)
    assert to_dense(back).tobytes() == dense.tobytes()
    with pytest.raises(SchemaError):  # the size bound holds before any data is read
        decode_encoded(wire, "t", max_elements=34)
    assert encoding.value_problem(back) is None
    # the values it sends: all of them, or a sparse tensor's kept ones
    values = encoding.values(tensor)
    assert values.dtype == np.float32
    expected = dense.reshape(-1)[KEPT] if isinstance(tensor, Sparse) else dense.reshape(-1)
    assert values.tobytes() == expected.tobytes()
    # add_scaled_into: each product rounded once to float32, summed in float64
    for scratch in (np.empty(4, np.float32), np.empty(64, np.float32)):
        total = np.ones(35, np.float64)
        encoding.add_scaled_into(tensor, total, np.float32(3), scratch)
        reference = 1 + (dense.reshape(-1) * np.float32(3)).astype(np.float64)
        assert total.tobytes() == reference.tobytes()
    # scaled: the same form, each number rounded once
    halved = encoding.scaled(tensor, np.float32(0.5))
    assert type(halved) is type(tensor)
    assert to_dense(halved).tobytes() == (dense * np.float32(0.5)).tobytes()
    # reader: any window of the flat tensor
    read = encoding.reader(tensor)
    for start, stop in ((0, 35), (3, 18), (34, 35), (5, 5)):
        out = np.full(stop - start, np.nan, np.float32)
        read(start, stop, out)
        assert out.tobytes() == dense.reshape(-1)[start:stop].tobytes()


def test_only_dense_values_can_be_coded_again():
    double = encoding_of(X).map_values(X, lambda v: v * 2)
    assert double.tobytes() == (X * 2).tobytes()
    sparse = SAMPLES["sparse f4"]
    assert (
        encoding_of(sparse).map_values(sparse, lambda v: v * 2).values.tobytes()
        == (sparse.values * 2).tobytes()
    )
    for coded in (SAMPLES["quant 8"], SAMPLES["sparse sign"]):
        with pytest.raises(TypeError, match="already coded"):
            encoding_of(coded).map_values(coded, lambda v: v)


# ------------------------------------------------------------------ a new encoding


@dataclass(frozen=True)
class Constant:
    """A test form: every element of the tensor holds the same float32 value."""

    shape: tuple[int, ...]
    value: float


class ConstantEncoding:
    """``{"enc": "const", "shape", "value"}``: all this test module adds to support it."""

    tag = "const"
    kind = Constant

    def decode(self, obj: Mapping[str, Any], field: str, *, max_elements: int) -> Constant:
        shape, _ = wire_shape(obj, field, max_elements)
        value = obj.get("value")
        if type(value) is not float or not math.isfinite(value):
            raise SchemaError("bad_field", f"{field}.value must be a finite float")
        return Constant(shape, float(np.float32(value)))

    def encode(self, tensor: Constant) -> dict[str, Any]:
        return {"enc": "const", "shape": list(tensor.shape), "value": tensor.value}

    def shape(self, tensor: Constant) -> tuple[int, ...]:
        return tensor.shape

    def to_dense(self, tensor: Constant) -> np.ndarray:
        return np.full(tensor.shape, tensor.value, np.float32)

    def values(self, tensor: Constant) -> np.ndarray:
        return self.to_dense(tensor).reshape(-1)

    def value_problem(self, tensor: Constant) -> str | None:
        return None

    def add_scaled_into(
        self, tensor: Constant, total: np.ndarray, scale: np.float32, scratch: np.ndarray
    ) -> None:
        total += np.float32(tensor.value) * scale

    def scaled(self, tensor: Constant, scale: np.float32) -> Constant:
        return Constant(tensor.shape, float(np.float32(tensor.value) * scale))

    def reader(self, tensor: Constant) -> Reader:
        def read(start: int, stop: int, out: np.ndarray) -> None:
            out[:] = tensor.value

        return read

    def map_values(self, tensor: Constant, fn: Callable[[np.ndarray], Any]) -> Any:
        raise TypeError("values are already coded")


@pytest.fixture
def constant_registered():
    encoding = ConstantEncoding()
    register(encoding)
    yield encoding
    unregister(encoding)


def test_a_new_encoding_is_one_module_and_its_registration(constant_registered):
    layout = {"w": (2, 3), "b": (3,)}
    delta = {"w": Constant((2, 3), 0.25), "b": np.array([1, 2, 3], np.float32)}
    update = NodeUpdate(federation="f", node_id="n", round=1, base_model_id="0" * 32,
                        num_examples=4, train_loss=0.5, train_seconds=1.0, delta=delta)  # fmt: skip
    decoded = decode_update(encode(update), layout=layout)
    assert decoded.delta["w"] == Constant((2, 3), 0.25)
    # the aggregator's sum, its clipping and its robust rules take it as it is
    total = WeightedSum(layout)
    total.add(decoded.delta, 4)
    assert total.mean()["w"].tolist() == [[0.25] * 3] * 2
    assert update_norm(decoded.delta) == pytest.approx(math.sqrt(6 * 0.0625 + 14))
    assert to_dense(scaled(decoded.delta, 2.0)["w"]).tolist() == [[0.5] * 3] * 2
    other = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    outcome = aggregate(parse_rule("median"), [(decoded.delta, 4), (other, 4), (other, 1)], layout)
    assert outcome.delta["w"].tolist() == [[0.0] * 3] * 2
    outcome = aggregate(parse_rule("median"), [(decoded.delta, 4), (decoded.delta, 1)], layout)
    assert outcome.delta["w"].tolist() == [[0.25] * 3] * 2
    with pytest.raises(SchemaError, match="is not dense, quant, sparse or const"):
        decode_encoded({"enc": "rle"}, "t", max_elements=1)


def test_a_form_registers_once(constant_registered):
    with pytest.raises(ValueError, match="registered twice"):
        register(ConstantEncoding())


def test_quantized_and_sparse_forms_are_the_registered_kinds():
    assert encoding_of(SAMPLES["quant 8"]).kind is Quantized
    assert encoding_of(SAMPLES["sparse f4"]).kind is Sparse
    with pytest.raises(TypeError, match="not an encoded tensor"):
        encoding_of([1.0])
