"""The task fields of the global model on the wire: ``task_version`` and ``task_fingerprint``
(docs/PROTOCOL.md 8.1, 8.6), optional, and old messages still decode."""

import dataclasses

import msgpack
import numpy as np
import pytest

from fedmq.schemas import (
    GlobalModel,
    SchemaError,
    TrainingPlan,
    apply_global_delta,
    decode_global,
    decode_global_delta,
    encode,
    model_id_of,
)
from fedmq.schemas.messages import MAX_TASK_VERSION, make_global_delta
from fedmq.tasks.layout import layout_of

PARAMS = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
FINGERPRINT = layout_of("t", "2", PARAMS).fingerprint


def make_global(**changes) -> GlobalModel:
    params = changes.pop("params", PARAMS)
    fields = {
        "federation": "fed",
        "round": 2,
        "model": "t",
        "model_id": model_id_of(params),
        "params": params,
        "plan": TrainingPlan(0.1, 16, 1, 0),
        "task_version": "2",
        "task_fingerprint": FINGERPRINT,
    }
    return GlobalModel(**(fields | changes))


def test_the_task_fields_travel_last_and_round_trip():
    payload = encode(make_global())
    wire = msgpack.unpackb(payload, raw=False)
    assert list(wire)[-2:] == ["task_version", "task_fingerprint"]
    assert wire["task_fingerprint"] == FINGERPRINT
    decoded = decode_global(payload)
    assert (decoded.task_version, decoded.task_fingerprint) == ("2", FINGERPRINT)


def test_without_them_a_global_is_byte_for_byte_what_it_was():
    """An older aggregator's message decodes with both None; None is not written."""
    plain = make_global(task_version=None, task_fingerprint=None)
    wire = msgpack.unpackb(encode(plain), raw=False)
    assert "task_version" not in wire and "task_fingerprint" not in wire
    decoded = decode_global(encode(plain))
    assert decoded.task_version is None and decoded.task_fingerprint is None


def test_a_task_without_a_version_sends_only_the_fingerprint():
    wire = msgpack.unpackb(encode(make_global(task_version=None)), raw=False)
    assert "task_version" not in wire and wire["task_fingerprint"] == FINGERPRINT


@pytest.mark.parametrize(
    ("key", "value", "detail"),
    [
        ("task_fingerprint", "ABCDEF" * 5 + "00", "task_fingerprint must be 32 lowercase hex"),
        ("task_fingerprint", "abc", "task_fingerprint must be 32 lowercase hex"),
        ("task_fingerprint", 5, "task_fingerprint must be str"),
        ("task_version", 2, "task_version must be str"),
        ("task_version", "v" * (MAX_TASK_VERSION + 1), "task_version is longer than 256"),
    ],
)
def test_malformed_task_fields_are_refused_by_name(key, value, detail):
    wire = msgpack.unpackb(encode(make_global()), raw=False)
    wire[key] = value
    with pytest.raises(SchemaError, match=detail) as info:
        decode_global(msgpack.packb(wire, use_bin_type=True))
    assert info.value.reason == "bad_field"


def test_nil_task_fields_decode_as_absent():
    wire = msgpack.unpackb(encode(make_global()), raw=False)
    wire["task_version"] = wire["task_fingerprint"] = None
    decoded = decode_global(msgpack.packb(wire, use_bin_type=True))
    assert decoded.task_version is None and decoded.task_fingerprint is None


def test_the_compact_form_carries_them_and_the_rebuilt_model_has_them():
    before = {name: array - 1 for name, array in PARAMS.items()}
    model = make_global()
    compact = decode_global_delta(encode(make_global_delta(before, model, model_id_of(before))))
    assert (compact.task_version, compact.task_fingerprint) == ("2", FINGERPRINT)
    rebuilt = apply_global_delta(before, compact)
    assert rebuilt == dataclasses.replace(model, params=rebuilt.params)
    wire = msgpack.unpackb(
        encode(make_global_delta(before, make_global(task_version=None), model_id_of(before))),
        raw=False,
    )
    assert "task_version" not in wire and wire["task_fingerprint"] == FINGERPRINT
