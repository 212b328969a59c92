"""The msgpack wire format: round trips, every rejection, and decoder robustness.

Rejection tests check the stable ``SchemaError.reason`` slug and that the error's detail
names the offending field.
"""

import copy
import dataclasses
import math
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.schemas import (
    SCHEMA_VERSION,
    GlobalModel,
    NodeStatus,
    NodeUpdate,
    RoundMetrics,
    SchemaError,
    ServerStatus,
    TrainingPlan,
    decode_global,
    decode_metrics,
    decode_server_status,
    decode_status,
    decode_update,
    encode,
    model_id_of,
)
from fedmq.schemas.messages import CLOSED_BY, MAX_LOSS, NODE_STATES, SERVER_STATES

# --------------------------------------------------------------------------- samples

PARAMS = {
    "w": (np.arange(6, dtype=np.float32).reshape(2, 3) - 2) * np.float32(0.5),
    "b": np.array([0.25, -0.5, 1.0], dtype=np.float32),
}
LAYOUT = {"w": (2, 3), "b": (3,)}
NUM_ELEMENTS = 9
MODEL_ID = model_id_of(PARAMS)
OTHER_ID = "0123456789abcdef" * 2


def f32(values: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    return array if shape is None else array.reshape(shape)


def make_global(**changes: Any) -> GlobalModel:
    if "params" in changes and "model_id" not in changes:
        changes["model_id"] = model_id_of(changes["params"])
    fields: dict[str, Any] = {
        "federation": "fed",
        "round": 2,
        "model": "digits-mlp",
        "model_id": MODEL_ID,
        "params": PARAMS,
        "plan": TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=42),
        "final": False,
        "created_at": 1_700_000_000.5,
    }
    return GlobalModel(**(fields | changes))


def make_update(**changes: Any) -> NodeUpdate:
    fields: dict[str, Any] = {
        "federation": "fed",
        "node_id": "node-1",
        "round": 2,
        "base_model_id": MODEL_ID,
        "num_examples": 100,
        "train_loss": 0.75,
        "train_seconds": 2.5,
        "delta": {"w": f32(np.linspace(-1, 1, 6), (2, 3)), "b": f32([0.0, 0.125, -0.125])},
        "compression": "dense",
        "sent_at": 1_700_000_003.25,
    }
    return NodeUpdate(**(fields | changes))


def make_status(**changes: Any) -> NodeStatus:
    fields: dict[str, Any] = {
        "federation": "fed",
        "node_id": "node-1",
        "state": "submitted",
        "round": 2,
        "model_id": MODEL_ID,
        "num_examples": 100,
        "at": 1_700_000_004.0,
        "detail": "ok",
    }
    return NodeStatus(**(fields | changes))


def make_server(**changes: Any) -> ServerStatus:
    fields: dict[str, Any] = {
        "federation": "fed",
        "state": "waiting",
        "round": 2,
        "expected_nodes": 3,
        "min_nodes": 2,
        "reported": 1,
        "deadline_seconds": 60.0,
        "at": 1_700_000_005.0,
    }
    return ServerStatus(**(fields | changes))


def make_metrics(**changes: Any) -> RoundMetrics:
    fields: dict[str, Any] = {
        "federation": "fed",
        "round": 2,
        "model_id": MODEL_ID,
        "participants": ["node-1", "node-2"],
        "num_examples": 200,
        "accuracy": 0.9,
        "loss": 0.3,
        "train_loss": 0.4,
        "uplink_bytes": 1000,
        "downlink_bytes": 2000,
        "global_bytes": 500,
        "rejected": {"wrong_round": 2, "non_finite": 1},
        "seconds": 3.5,
        "aggregate_seconds": 0.01,
        "closed_by": "deadline",
        "at": 1_700_000_006.0,
    }
    return RoundMetrics(**(fields | changes))


MAKE: dict[str, Callable[..., Any]] = {
    "global": make_global,
    "update": make_update,
    "status": make_status,
    "server": make_server,
    "metrics": make_metrics,
}
DECODE: dict[str, Callable[..., Any]] = {
    "global": decode_global,
    "update": decode_update,
    "status": decode_status,
    "server": decode_server_status,
    "metrics": decode_metrics,
}
KINDS = list(MAKE)
DELETE = object()


# --------------------------------------------------------------------------- helpers


def plain(value: Any) -> Any:
    """Comparable form: arrays as (dtype, shape, bytes); scalar types and dict order count."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (type(value).__name__, [(f.name, plain(getattr(value, f.name))) for f in fields])
    if isinstance(value, dict):
        return ("dict", [(key, plain(item)) for key, item in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [plain(item) for item in value])
    return (type(value).__name__, value)


def wire(kind: str, **changes: Any) -> dict[str, Any]:
    return msgpack.unpackb(encode(MAKE[kind](**changes)), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def mutated(kind: str, path: tuple[str, ...], value: Any) -> bytes:
    """The valid message of ``kind`` with the field at ``path`` set to ``value`` (or deleted)."""
    obj = wire(kind)
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return pack(obj)


def names(detail: str, field: str) -> bool:
    """Whether ``detail`` mentions ``field`` as a whole name (not inside a longer one)."""
    return re.search(rf"(?<![\w.]){re.escape(field)}(?!\w)", detail) is not None


def rejects(
    decode: Callable[..., Any], payload: Any, reason: str, field: str, **options: Any
) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(payload, **options)
    error = info.value
    assert error.reason == reason, str(error)
    assert names(error.detail, field), f"{field!r} not named in {error.detail!r}"
    assert str(error) == f"{reason}: {error.detail}"
    return error


# --------------------------------------------------------------------------- round trips

ROUND_TRIPS = {
    "global": make_global(),
    "global-final": make_global(final=True, round=10),
    "global-f16": make_global(params={"w": PARAMS["w"].astype(np.float16), "b": PARAMS["b"]}),
    "global-scalar-and-empty": make_global(
        params={"s": f32(3.5, ()), "e": f32([], (0, 4)), "w": PARAMS["w"]}
    ),
    "update": make_update(),
    "update-negative-loss-and-zero-seconds": make_update(train_loss=-1.5, train_seconds=0.0),
    "status": make_status(),
    "status-minimal": NodeStatus(federation="fed", node_id="n", state="online"),
    "server": make_server(),
    "server-minimal": make_server(round=0, deadline_seconds=None, at=None),
    "metrics": make_metrics(),
    "metrics-no-eval": make_metrics(accuracy=None, loss=None, train_loss=None),
    "metrics-median": make_metrics(train_seconds_median=1.25),
    "metrics-empty-round": make_metrics(participants=[], num_examples=0, rejected={}),
    "metrics-extra": make_metrics(extra={"eval_examples": 360, "notes": ["a", 1.5, None]}),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip(name):
    message = ROUND_TRIPS[name]
    kind = {
        GlobalModel: "global",
        NodeUpdate: "update",
        NodeStatus: "status",
        ServerStatus: "server",
        RoundMetrics: "metrics",
    }[type(message)]
    payload = encode(message)
    decoded = DECODE[kind](payload)
    assert type(decoded) is type(message)
    assert plain(decoded) == plain(message)
    assert encode(decoded) == payload


@pytest.mark.parametrize("state", NODE_STATES)
def test_every_node_state_round_trips(state):
    assert decode_status(encode(make_status(state=state))).state == state


@pytest.mark.parametrize("state", SERVER_STATES)
def test_every_server_state_round_trips(state):
    assert decode_server_status(encode(make_server(state=state))).state == state


@pytest.mark.parametrize("closed_by", CLOSED_BY)
def test_every_close_reason_round_trips(closed_by):
    assert decode_metrics(encode(make_metrics(closed_by=closed_by))).closed_by == closed_by


def test_wire_map_starts_with_version_and_type():
    for kind in KINDS:
        obj = wire(kind)
        assert list(obj)[:2] == ["v", "type"]
        assert obj["v"] == SCHEMA_VERSION == 1
        assert obj["type"] == kind


def test_tensor_wire_form_is_dtype_shape_and_raw_little_endian_bytes():
    tensor = wire("global")["params"]["w"]
    assert tensor == {
        "dtype": "<f4",
        "shape": [2, 3],
        "data": PARAMS["w"].astype("<f4").tobytes(),
    }


def test_floats_travel_as_float64():
    at = 1_700_000_000.123456789
    payload = encode(make_update(sent_at=at, train_loss=0.1))
    assert decode_update(payload).sent_at == at
    assert decode_update(payload).train_loss == 0.1
    assert b"\xcb" + struct.pack(">d", at) in payload  # msgpack float 64


def test_big_endian_and_non_contiguous_arrays_encode_like_their_little_endian_copy():
    little = make_update(delta={"w": PARAMS["w"]})
    big = make_update(delta={"w": PARAMS["w"].astype(">f4")})
    fortran = make_update(delta={"w": np.asfortranarray(PARAMS["w"])})
    strided = make_update(delta={"w": np.repeat(PARAMS["w"], 2, axis=1)[:, ::2]})
    assert encode(big) == encode(little)
    assert encode(fortran) == encode(little)
    assert encode(strided) == encode(little)
    decoded = decode_update(encode(big)).delta["w"]
    assert decoded.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded, PARAMS["w"])


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint8, np.bool_, np.complex64])
def test_encode_refuses_dtypes_that_cannot_travel(dtype):
    with pytest.raises(ValueError, match="cannot travel"):
        encode(make_update(delta={"w": np.zeros((2, 3), dtype=dtype)}))


def test_encode_refuses_what_is_not_a_message():
    with pytest.raises(TypeError, match="not a fedmq message"):
        encode(TrainingPlan(learning_rate=0.1, batch_size=1, local_epochs=1, seed=0))  # type: ignore[arg-type]


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_decoded_arrays_are_read_only(wrap):
    update = decode_update(wrap(encode(make_update())))
    global_model = decode_global(wrap(encode(make_global())))
    for array in [*update.delta.values(), *global_model.params.values()]:
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0


def test_integers_are_accepted_where_a_float_is_expected():
    payload = mutated("update", ("train_seconds",), 3)
    decoded = decode_update(payload)
    assert decoded.train_seconds == 3.0
    assert type(decoded.train_seconds) is float


def test_longest_ids_are_accepted():
    longest = "x" * 64
    decoded = decode_update(encode(make_update(federation=longest, node_id=longest)))
    assert decoded.federation == decoded.node_id == longest


# --------------------------------------------------------------------------- model ids


def test_model_id_is_32_lowercase_hex_and_deterministic():
    assert re.fullmatch(r"[0-9a-f]{32}", MODEL_ID)
    assert model_id_of({k: v.copy() for k, v in PARAMS.items()}) == MODEL_ID
    assert model_id_of({k: v.astype(">f4") for k, v in PARAMS.items()}) == MODEL_ID


@pytest.mark.parametrize(
    "params",
    [
        {"b": PARAMS["b"], "w": PARAMS["w"]},  # order
        {"W": PARAMS["w"], "b": PARAMS["b"]},  # name
        {"w": PARAMS["w"].reshape(3, 2), "b": PARAMS["b"]},  # shape, same bytes
        {"w": PARAMS["w"].reshape(6), "b": PARAMS["b"]},  # rank
        {"w": PARAMS["w"].astype(np.float16), "b": PARAMS["b"]},  # dtype, same values
        {"w": PARAMS["w"] + np.float32(0.5), "b": PARAMS["b"]},  # values
        {"w": PARAMS["w"]},  # fewer tensors
    ],
    ids=["order", "name", "shape", "rank", "dtype", "values", "subset"],
)
def test_model_id_changes_with_anything_that_changes_the_model(params):
    assert model_id_of(params) != MODEL_ID


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1v"], ids=repr)
def test_not_msgpack_is_malformed(kind, payload):
    rejects(DECODE[kind], payload, "malformed", "msgpack")


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_payload_is_malformed(kind):
    payload = encode(MAKE[kind]())
    for end in (1, 2, len(payload) // 3, len(payload) // 2, len(payload) - 1):
        rejects(DECODE[kind], payload[:end], "malformed", "msgpack")


@pytest.mark.parametrize("kind", KINDS)
def test_trailing_bytes_are_malformed(kind):
    rejects(DECODE[kind], encode(MAKE[kind]()) + b"\xc0", "malformed", "msgpack")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("obj", [[1, 2], "global", 1, None, b"\x01", 1.5])
def test_not_a_map_is_malformed(kind, obj):
    rejects(DECODE[kind], pack(obj), "malformed", "map")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("payload", ["text", None, 7, [1]], ids=repr)
def test_payload_that_is_not_bytes_is_malformed(kind, payload):
    rejects(DECODE[kind], payload, "malformed", "bytes")


@pytest.mark.parametrize("kind", KINDS)
def test_map_with_non_string_keys_is_malformed(kind):
    obj = wire(kind)
    payload = pack({**obj, 1: "x"})
    rejects(DECODE[kind], payload, "malformed", "msgpack")


@pytest.mark.parametrize("kind", KINDS)
def test_msgpack_extension_types_are_malformed(kind):
    obj = wire(kind) | {"future": msgpack.ExtType(5, b"x")}
    rejects(DECODE[kind], pack(obj), "malformed", "msgpack")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("missing", [DELETE, None], ids=["absent", "nil"])
def test_missing_version_is_rejected(kind, missing):
    rejects(DECODE[kind], mutated(kind, ("v",), missing), "bad_field", "v")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", [2, 0, -1, "1", True, 1.0, [1], b"\x01"], ids=lambda v: repr(v))
def test_unknown_version_is_rejected(kind, version):
    error = rejects(DECODE[kind], mutated(kind, ("v",), version), "unsupported_version", "version")
    assert repr(version) in error.detail


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("other", KINDS)
def test_payload_of_another_kind_is_wrong_type(kind, other):
    if kind == other:
        assert DECODE[kind](encode(MAKE[other]())) is not None
        return
    error = rejects(DECODE[kind], encode(MAKE[other]()), "wrong_type", "type")
    assert repr(kind) in error.detail


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [DELETE, None, "Global", "", 1, ["update"]], ids=repr)
def test_missing_or_bad_type_is_wrong_type(kind, value):
    rejects(DECODE[kind], mutated(kind, ("type",), value), "wrong_type", "type")


@pytest.mark.parametrize("kind", KINDS)
def test_payload_over_max_bytes_is_oversized(kind):
    payload = encode(MAKE[kind]())
    assert DECODE[kind](payload, max_bytes=len(payload)) is not None
    error = rejects(
        DECODE[kind], payload, "oversized", f"{len(payload)}", max_bytes=len(payload) - 1
    )
    assert f"{len(payload) - 1}" in error.detail


@pytest.mark.parametrize("kind", ["status", "server"])
def test_status_messages_have_a_small_default_size_limit(kind):
    payload = pack(wire(kind) | {"padding": "x" * 70_000})
    rejects(DECODE[kind], payload, "oversized", str(len(payload)))


# --------------------------------------------------------------------------- forward compat


FUTURE = {"a": [1, 2.5, None, b"\x00", {"nested": True}], "b": "x"}


@pytest.mark.parametrize("kind", ["global", "update", "status", "server"])
def test_unknown_extra_keys_are_ignored(kind):
    obj = wire(kind)
    obj["zz_future_field"] = FUTURE
    obj = {"aa_future_field": 1} | obj  # before "v" too
    if kind == "global":
        obj["plan"]["momentum"] = 0.9
        obj["params"]["w"]["order"] = "C"
    if kind == "update":
        obj["delta"]["b"]["scale"] = 1.0
    assert plain(DECODE[kind](pack(obj))) == plain(MAKE[kind]())


def test_unknown_metrics_keys_are_kept_in_extra():
    obj = wire("metrics") | {"zz_future_field": FUTURE}
    decoded = decode_metrics(pack(obj))
    assert decoded.extra == {"zz_future_field": FUTURE}
    assert plain(dataclasses.replace(decoded, extra={})) == plain(make_metrics())


def test_metrics_with_extra_still_starts_with_version_and_type():
    obj = msgpack.unpackb(encode(make_metrics(extra={"eval_examples": 1})), raw=False)
    assert list(obj)[:2] == ["v", "type"]


# --------------------------------------------------------------------------- fields

# Every field of every message and the wire type it must have.
REQUIRED: dict[str, dict[tuple[str, ...], str]] = {
    "global": {
        ("federation",): "str",
        ("round",): "int",
        ("model",): "str",
        ("model_id",): "str",
        ("final",): "bool",
        ("created_at",): "float",
        ("plan",): "map",
        ("plan", "learning_rate"): "float",
        ("plan", "batch_size"): "int",
        ("plan", "local_epochs"): "int",
        ("plan", "seed"): "int",
        ("params",): "map",
    },
    "update": {
        ("federation",): "str",
        ("node_id",): "str",
        ("round",): "int",
        ("base_model_id",): "str",
        ("num_examples",): "int",
        ("train_loss",): "float",
        ("train_seconds",): "float",
        ("sent_at",): "float",
        ("compression",): "str",
        ("delta",): "map",
    },
    "status": {("federation",): "str", ("node_id",): "str", ("state",): "str"},
    "server": {
        ("federation",): "str",
        ("state",): "str",
        ("round",): "int",
        ("expected_nodes",): "int",
        ("min_nodes",): "int",
        ("reported",): "int",
    },
    "metrics": {
        ("federation",): "str",
        ("round",): "int",
        ("model_id",): "str",
        ("participants",): "list",
        ("num_examples",): "int",
        ("uplink_bytes",): "int",
        ("downlink_bytes",): "int",
        ("global_bytes",): "int",
        ("rejected",): "map",
        ("seconds",): "float",
        ("aggregate_seconds",): "float",
        ("closed_by",): "str",
        ("at",): "float",
    },
}
OPTIONAL: dict[str, dict[tuple[str, ...], str]] = {
    "status": {
        ("round",): "int",
        ("model_id",): "str",
        ("num_examples",): "int",
        ("at",): "float",
        ("detail",): "str",
    },
    "server": {("deadline_seconds",): "float", ("at",): "float"},
    "metrics": {
        ("accuracy",): "float",
        ("loss",): "float",
        ("train_loss",): "float",
        ("train_seconds_median",): "float",
    },
}
ILL_TYPED: dict[str, list[Any]] = {
    "str": [5, b"fed", ["fed"], {"fed": 1}, True, 1.5],
    "int": ["3", 3.0, 3.5, True, [3], b"\x03"],
    "float": ["1.5", True, False, b"\x00", [1.5], {"x": 1.5}],
    "bool": [1, 0, "true", 1.0],
    "map": [[], "x", 1, [["w", 1]]],
    "list": [{}, "node-1", 1],
}


def _cases(table: dict[str, dict[tuple[str, ...], str]]) -> Iterator[tuple[str, tuple, str]]:
    for kind, fields in table.items():
        for path, wire_type in fields.items():
            yield kind, path, wire_type


def _id(value: Any) -> str:
    return "-".join(map(str, value)) if isinstance(value, tuple) else repr(value)


@pytest.mark.parametrize("missing", [DELETE, None], ids=["absent", "nil"])
@pytest.mark.parametrize(("kind", "path", "_type"), list(_cases(REQUIRED)), ids=_id)
def test_missing_required_field_is_rejected(kind, path, _type, missing):
    rejects(DECODE[kind], mutated(kind, path, missing), "bad_field", path[-1])


@pytest.mark.parametrize(("kind", "path", "_type"), list(_cases(OPTIONAL)), ids=_id)
def test_optional_field_may_be_absent_or_nil(kind, path, _type):
    for missing in (DELETE, None):
        decoded = DECODE[kind](mutated(kind, path, missing))
        assert getattr(decoded, path[-1]) is None


@pytest.mark.parametrize(
    ("kind", "path", "bad"),
    [
        (kind, path, bad)
        for kind, path, wire_type in [*_cases(REQUIRED), *_cases(OPTIONAL)]
        for bad in ILL_TYPED[wire_type]
    ],
    ids=_id,
)
def test_ill_typed_field_is_rejected(kind, path, bad):
    rejects(DECODE[kind], mutated(kind, path, bad), "bad_field", path[-1])


def _every_float_field() -> list[tuple[str, tuple[str, ...]]]:
    return [
        (kind, path)
        for kind, path, wire_type in [*_cases(REQUIRED), *_cases(OPTIONAL)]
        if wire_type == "float"
    ]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize(("kind", "path"), _every_float_field(), ids=_id)
def test_non_finite_float_field_is_rejected(kind, path, value):
    rejects(DECODE[kind], mutated(kind, path, value), "non_finite", path[-1])


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("global", ("round",), 0),
        ("global", ("round",), -1),
        ("global", ("plan", "batch_size"), 0),
        ("global", ("plan", "local_epochs"), 0),
        ("global", ("plan", "local_epochs"), -3),
        ("global", ("plan", "learning_rate"), 0.0),
        ("global", ("plan", "learning_rate"), 0),
        ("global", ("plan", "learning_rate"), -0.1),
        ("global", ("plan", "seed"), -1),
        ("update", ("num_examples",), 2**24 + 1),
        ("update", ("round",), 0),
        ("update", ("num_examples",), 0),
        ("update", ("train_seconds",), -0.5),
        ("server", ("round",), -1),
        ("server", ("expected_nodes",), -1),
        ("server", ("min_nodes",), -1),
        ("server", ("reported",), -1),
        ("metrics", ("round",), 0),
        ("metrics", ("num_examples",), -1),
        ("metrics", ("uplink_bytes",), -1),
        ("metrics", ("downlink_bytes",), -1),
        ("metrics", ("global_bytes",), -1),
    ],
    ids=_id,
)
def test_out_of_range_number_is_rejected(kind, path, value):
    rejects(DECODE[kind], mutated(kind, path, value), "bad_field", path[-1])


@pytest.mark.parametrize("loss", [1e13, 1e30, 1.7e308, -1e30])
def test_a_huge_finite_train_loss_is_accepted_at_the_bound(loss):
    """A model poisoned before the defaults bounded weights sent honest nodes' losses to
    ~1e30; rejecting those updates (bad_field) left the round without them and the run
    stalled. A finite loss is accepted, saturated to +-MAX_LOSS (metrics stay finite)."""
    decoded = decode_update(mutated("update", ("train_loss",), loss))
    assert decoded.train_loss == math.copysign(MAX_LOSS, loss)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("global", ("round",), 1),
        ("global", ("plan", "seed"), 0),
        ("global", ("plan", "learning_rate"), 1e-9),
        ("update", ("num_examples",), 2**24),
        ("update", ("train_loss",), 1e12),
        ("update", ("train_loss",), -1e12),
        ("update", ("round",), 1),
        ("update", ("num_examples",), 1),
        ("update", ("train_seconds",), 0),
        ("server", ("round",), 0),
        ("server", ("reported",), 0),
        ("metrics", ("num_examples",), 0),
        ("metrics", ("uplink_bytes",), 0),
        ("metrics", ("round",), 2**63),
    ],
    ids=_id,
)
def test_boundary_numbers_are_accepted(kind, path, value):
    decoded = DECODE[kind](mutated(kind, path, value))
    target = decoded.plan if path[0] == "plan" else decoded
    assert getattr(target, path[-1]) == value


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("status", ("state",), "sleeping"),
        ("status", ("state",), ""),
        ("status", ("state",), "Online"),
        ("server", ("state",), "training"),
        ("metrics", ("closed_by",), "timeout"),
    ],
    ids=_id,
)
def test_unknown_choice_is_rejected(kind, path, value):
    error = rejects(DECODE[kind], mutated(kind, path, value), "bad_field", path[-1])
    assert repr(value) in error.detail


BAD_IDS = ["a/b", "+", "#", "", "x" * 65, "a b", "node\n", "héllo", "fed/+/#"]


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("global", "federation"),
        ("update", "federation"),
        ("update", "node_id"),
        ("status", "federation"),
        ("status", "node_id"),
        ("server", "federation"),
        ("metrics", "federation"),
    ],
    ids=_id,
)
def test_bad_id_characters_are_rejected(kind, field, value):
    rejects(DECODE[kind], mutated(kind, (field,), value), "bad_field", field)


@pytest.mark.parametrize("value", ["0" * 31, "0" * 33, "A" * 32, "g" * 32, "", MODEL_ID + "\n"])
@pytest.mark.parametrize(
    ("kind", "field"),
    [("global", "model_id"), ("update", "base_model_id"), ("metrics", "model_id")],
    ids=_id,
)
def test_malformed_model_id_is_rejected(kind, field, value):
    rejects(DECODE[kind], mutated(kind, (field,), value), "bad_field", field)


@pytest.mark.parametrize("value", ["", "Dense", "dense ", "x" * 65, "int8;rm"], ids=repr)
def test_a_compression_that_is_not_a_spec_is_rejected(value):
    # The grammar itself is checked by the aggregator against the SPEC it announced
    # ("wrong_compression"); the decoder only refuses what cannot be a SPEC at all.
    error = rejects(
        decode_update, mutated("update", ("compression",), value), "bad_field", "compression"
    )
    assert repr(value) in error.detail


@pytest.mark.parametrize("value", [[1], ["node-1", None], [b"node-1"], [["node-1"]]], ids=repr)
def test_participants_must_be_strings(value):
    rejects(
        decode_metrics, mutated("metrics", ("participants",), value), "bad_field", "participants"
    )


@pytest.mark.parametrize(
    "value", [{"x": -1}, {"x": "1"}, {"x": True}, {"x": 1.0}, {"x": None}], ids=repr
)
def test_rejected_counts_must_be_non_negative_integers(value):
    rejects(decode_metrics, mutated("metrics", ("rejected",), value), "bad_field", "rejected")


# --------------------------------------------------------------------------- tensors

CONTAINERS = [("global", "params"), ("update", "delta")]


def _first_tensor(kind: str, container: str) -> str:
    return next(iter(wire(kind)[container]))


TENSOR_CASES = [
    # (path inside the tensor (empty = the tensor itself), value, reason, named suffix)
    ((), [1, 2], "bad_field", ""),
    ((), "x", "bad_field", ""),
    ((), None, "bad_field", ""),
    (("dtype",), "<f8", "bad_dtype", ".dtype"),
    (("dtype",), ">f4", "bad_dtype", ".dtype"),
    (("dtype",), "float32", "bad_dtype", ".dtype"),
    (("dtype",), "<i4", "bad_dtype", ".dtype"),
    (("dtype",), "|u1", "bad_dtype", ".dtype"),
    (("dtype",), b"<f4", "bad_dtype", ".dtype"),
    (("dtype",), 5, "bad_dtype", ".dtype"),
    (("dtype",), None, "bad_dtype", ".dtype"),
    (("dtype",), DELETE, "bad_dtype", ".dtype"),
    (("shape",), [-2, -3], "bad_shape", ".shape"),
    (("shape",), [2, -3], "bad_shape", ".shape"),
    (("shape",), [-1], "bad_shape", ".shape"),
    (("shape",), "2,3", "bad_shape", ".shape"),
    (("shape",), 6, "bad_shape", ".shape"),
    (("shape",), [2.0, 3], "bad_shape", ".shape"),
    (("shape",), [True, 3], "bad_shape", ".shape"),
    (("shape",), [[2], 3], "bad_shape", ".shape"),
    (("shape",), [1] * 9, "bad_shape", ".shape"),
    (("shape",), {"0": 2}, "bad_shape", ".shape"),
    (("shape",), None, "bad_shape", ".shape"),
    (("shape",), DELETE, "bad_shape", ".shape"),
    (("data",), "abc", "bad_field", ".data"),
    (("data",), [0] * 24, "bad_field", ".data"),
    (("data",), None, "bad_field", ".data"),
    (("data",), DELETE, "bad_field", ".data"),
    # data length not matching shape x itemsize
    (("data",), b"", "bad_shape", ".data"),
    (("data",), b"\x00" * 23, "bad_shape", ".data"),
    (("data",), b"\x00" * 25, "bad_shape", ".data"),
    (("data",), b"\x00" * 12, "bad_shape", ".data"),
    (("shape",), [3, 3], "bad_shape", ".data"),
    (("shape",), [2, 3, 2], "bad_shape", ".data"),
    (("dtype",), "<f2", "bad_shape", ".data"),
]


@pytest.mark.parametrize(("inner", "value", "reason", "suffix"), TENSOR_CASES, ids=_id)
@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_bad_tensor_is_rejected(kind, container, inner, value, reason, suffix):
    name = _first_tensor(kind, container)
    payload = mutated(kind, (container, name, *inner), value)
    rejects(DECODE[kind], payload, reason, f"{container}.{name}{suffix}")


@pytest.mark.parametrize("value", [{}, [], "w", None], ids=repr)
@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_empty_or_non_map_tensor_set_is_rejected(kind, container, value):
    rejects(DECODE[kind], mutated(kind, (container,), value), "bad_field", container)


def _with_tensors(kind: str, tensors: dict[str, np.ndarray]) -> bytes:
    if kind == "global":
        return encode(make_global(params=tensors))  # model_id matches the tensors
    return encode(make_update(delta=tensors))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize(
    ("kind", "container", "dtype"),
    [("global", "params", "<f4"), ("global", "params", "<f2"), ("update", "delta", "<f4")],
    ids=_id,
)
def test_non_finite_tensor_is_rejected(kind, container, dtype, value):
    bad = np.array([0.5, -0.25, 1.0, 2.0], dtype=dtype)
    bad[2] = value
    tensors = {"w": PARAMS["w"], "bad": bad}
    rejects(DECODE[kind], _with_tensors(kind, tensors), "non_finite", f"{container}.bad")


@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_non_finite_in_an_otherwise_valid_message_is_the_only_problem(kind, container):
    # Same message with finite values decodes: non_finite above is not a side effect.
    tensors = {"w": PARAMS["w"], "bad": np.array([0.5, -0.25, 1.0, 2.0], dtype="<f4")}
    assert DECODE[kind](_with_tensors(kind, tensors)) is not None


@pytest.mark.parametrize(
    ("kind", "container", "tensor"),
    [
        ("global", "params", np.array([3e38, -3e38], dtype="<f4")),
        ("global", "params", np.array([2e19], dtype="<f4")),  # (2e19)**2 > float32 max
        ("global", "params", np.full(1000, 10.0, dtype="<f2")),  # sum 1e5 > float16 max
    ],
    ids=["global-f32-3e38", "global-f32-2e19", "global-f16-1000x10"],
)
def test_large_finite_tensor_decodes_without_warnings(kind, container, tensor):
    decoded = DECODE[kind](_with_tensors(kind, {"t": tensor}))
    np.testing.assert_array_equal(getattr(decoded, container)["t"], tensor)


@pytest.mark.parametrize("value", [3e38, 2e19, 1.01e15], ids=repr)
def test_a_delta_value_beyond_the_bound_is_out_of_range(value):
    # One accepted update must not be able to push the weighted sum to Inf.
    payload = _with_tensors("update", {"t": np.array([value, -1.0], dtype="<f4")})
    rejects(decode_update, payload, "out_of_range", "delta.t")


@pytest.mark.parametrize("dtype", [[], ["<f4"], {}, {"<f4": 1}], ids=repr)
@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_unhashable_dtype_is_rejected(kind, container, dtype):
    name = _first_tensor(kind, container)
    payload = mutated(kind, (container, name, "dtype"), dtype)
    rejects(DECODE[kind], payload, "bad_dtype", f"{container}.{name}.dtype")


def test_a_float16_delta_decodes_as_float16():
    # Whether float16 is what the federation's pipeline sends is the aggregator's check
    # ("wrong_encoding"); the decoder returns exactly what was sent.
    delta = {"w": PARAMS["w"].astype(np.float16), "b": PARAMS["b"]}
    decoded = decode_update(encode(make_update(delta=delta)), layout=LAYOUT)
    assert decoded.delta["w"].dtype == np.float16
    np.testing.assert_array_equal(decoded.delta["w"], delta["w"])


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "+", "#", "héllo", "w\n", "w:0"], ids=repr)
@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_bad_tensor_name_is_rejected(kind, container, name):
    obj = wire(kind)
    obj[container] = {name: obj[container]["w"]}
    rejects(DECODE[kind], pack(obj), "bad_field", container)


@pytest.mark.parametrize("name", ["l0.w", "encoder/layer_1.kernel", "-", "x" * 64])
@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_tensor_names_may_use_slashes_dots_and_dashes(kind, container, name):
    decoded = DECODE[kind](_with_tensors(kind, {name: PARAMS["w"]}))
    assert list(getattr(decoded, container)) == [name]


@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_binary_tensor_name_is_rejected(kind, container):
    obj = wire(kind)
    obj[container] = {b"w": obj[container]["w"]}
    rejects(DECODE[kind], pack(obj), "bad_field", container)


@pytest.mark.parametrize(
    "shape", [[0, 2**64 - 1], [0, 2**63], [0, 2**63 - 1], [0, 2**31, 2**31, 2**31]], ids=repr
)
@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_zero_sized_tensor_with_huge_dimension_is_rejected(kind, container, shape):
    name = _first_tensor(kind, container)
    obj = wire(kind)
    obj[container][name] = {"dtype": "<f4", "shape": shape, "data": b""}
    with pytest.raises(SchemaError) as info:
        DECODE[kind](pack(obj))
    assert info.value.reason in ("bad_shape", "oversized"), str(info.value)
    assert names(info.value.detail, f"{container}.{name}"), str(info.value)


@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_element_budget_is_shared_by_all_tensors(kind, container):
    payload = _with_tensors(kind, PARAMS)  # w: 6 elements, then b: 3
    decoded = DECODE[kind](payload, max_elements=NUM_ELEMENTS)
    assert sum(a.size for a in getattr(decoded, container).values()) == NUM_ELEMENTS
    rejects(DECODE[kind], payload, "oversized", f"{container}.b", max_elements=NUM_ELEMENTS - 1)
    rejects(DECODE[kind], payload, "oversized", f"{container}.w", max_elements=5)


@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_huge_declared_shape_is_oversized_before_reading_data(kind, container):
    name = _first_tensor(kind, container)
    payload = mutated(kind, (container, name, "shape"), [2**32, 2**32])
    rejects(DECODE[kind], payload, "oversized", f"{container}.{name}")


@pytest.mark.parametrize(("kind", "container"), CONTAINERS, ids=_id)
def test_scalar_tensor_counts_against_max_elements(kind, container):
    payload = _with_tensors(kind, {"w": PARAMS["w"], "s": f32(1.5, ())})
    rejects(DECODE[kind], payload, "oversized", f"{container}.s", max_elements=6)


# --------------------------------------------------------------------------- layout & ids


def test_update_matching_the_layout_is_accepted():
    update = decode_update(encode(make_update()), layout=LAYOUT)
    assert {name: array.shape for name, array in update.delta.items()} == LAYOUT


@pytest.mark.parametrize(
    ("layout", "field"),
    [
        ({"w": (3, 2), "b": (3,)}, "delta.w"),  # same size, transposed
        ({"w": (6,), "b": (3,)}, "delta.w"),
        ({"w": (2, 3), "b": (4,)}, "delta.b"),
        ({"w": (2, 3), "b": ()}, "delta.b"),
        ({"w": (2, 3)}, "delta"),  # update has a tensor the model lacks
        ({"w": (2, 3), "b": (3,), "c": (1,)}, "delta"),  # update lacks one
        ({"W": (2, 3), "b": (3,)}, "delta"),  # renamed
    ],
    ids=_id,
)
def test_update_not_matching_the_layout_is_rejected(layout, field):
    rejects(decode_update, encode(make_update()), "layout_mismatch", field, layout=layout)


def test_without_a_layout_any_shapes_are_accepted():
    delta = {"x": f32(np.zeros((5, 1, 2)))}
    assert decode_update(encode(make_update(delta=delta))).delta["x"].shape == (5, 1, 2)


def test_global_model_id_must_match_its_params():
    rejects(decode_global, encode(make_global(model_id=OTHER_ID)), "bad_model_id", "model_id")


@pytest.mark.parametrize(
    "params",
    [
        {"w": PARAMS["w"] + np.float32(1), "b": PARAMS["b"]},
        {"b": PARAMS["b"], "w": PARAMS["w"]},
        {"w": PARAMS["w"].reshape(3, 2), "b": PARAMS["b"]},
        {"w": PARAMS["w"]},
    ],
    ids=["values", "order", "shape", "subset"],
)
def test_global_with_params_changed_under_its_model_id_is_rejected(params):
    rejects(
        decode_global,
        encode(make_global(params=params, model_id=MODEL_ID)),
        "bad_model_id",
        "model_id",
    )


# --------------------------------------------------------------------------- robustness

# These properties say: a decoder given anything returns a message or raises SchemaError.

DECODERS = list(DECODE.values())
KEYS = sorted(
    {"v", "type", "dtype", "shape", "data"}
    | {path[-1] for table in (REQUIRED, OPTIONAL) for fields in table.values() for path in fields}
)
STRINGS = st.sampled_from(
    [*KINDS, "<f4", "<f2", "dense", MODEL_ID, "fed", "node-1", *NODE_STATES, *CLOSED_BY]
) | st.text(max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | STRINGS
    | st.binary(max_size=32)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS) | st.text(max_size=6) | st.binary(max_size=4),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def decode_with_every_decoder(payload: bytes) -> list[Any]:
    """Decoded messages (SchemaError is fine); any other exception fails the test."""
    results = []
    for decode in DECODERS:
        try:
            results.append(decode(payload))
        except SchemaError as error:
            assert error.reason and error.detail
    return results


@settings(FUZZ, max_examples=2000)
@given(payload=st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_raise_schema_error(payload):
    decode_with_every_decoder(payload)


@FUZZ
@given(obj=VALUES)
def test_arbitrary_msgpack_values_decode_or_raise_schema_error(obj):
    assert decode_with_every_decoder(pack(obj)) == []  # never a valid message by chance


SHALLOW = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), SCALARS, max_size=4)
)
TENSOR_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["<f4", "<f2", "<f8"]) | SCALARS,
        "shape": st.lists(st.integers(-1, 4), max_size=3) | SHALLOW,
        "data": st.binary(max_size=48) | SCALARS,
    },
)
TENSORS_LIKE = st.dictionaries(
    st.sampled_from(["w", "b", "l0.w"]) | st.text(max_size=4) | st.binary(max_size=2),
    TENSOR_LIKE | SCALARS,
    max_size=3,
)


def _maps_of(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """Maps with a valid head whose known fields of ``kind`` hold arbitrary values."""
    keys = {path[0] for table in (REQUIRED, OPTIONAL) for path in table.get(kind, {})}
    body = st.fixed_dictionaries(
        {},
        optional={
            key: TENSORS_LIKE if key in ("params", "delta") else SHALLOW for key in sorted(keys)
        },
    )
    return body.map(lambda fields: {"v": 1, "type": kind} | fields)


@FUZZ
@given(obj=st.sampled_from(KINDS).flatmap(_maps_of))
def test_arbitrary_maps_with_a_valid_head_decode_or_raise_schema_error(obj):
    decode_with_every_decoder(pack(obj))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    paths = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            paths.append((*prefix, key))
            paths.extend(_paths(value, (*prefix, key)))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            paths.append((*prefix, index))
            paths.extend(_paths(value, (*prefix, index)))
    return paths


SAMPLE_WIRES = {kind: wire(kind) for kind in KINDS} | {
    "metrics-extra": msgpack.unpackb(encode(ROUND_TRIPS["metrics-extra"]), raw=False),
    "status-minimal": msgpack.unpackb(encode(ROUND_TRIPS["status-minimal"]), raw=False),
}


@FUZZ
@given(data=st.data())
def test_valid_message_with_one_field_replaced_decodes_or_raises_schema_error(data):
    name = data.draw(st.sampled_from(sorted(SAMPLE_WIRES)), label="sample")
    obj = copy.deepcopy(SAMPLE_WIRES[name])
    path = data.draw(st.sampled_from(_paths(obj)), label="path")
    value = data.draw(st.just(DELETE) | VALUES, label="value")
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    decode = DECODE[name.split("-")[0]]
    try:
        decoded = decode(pack(obj))
    except SchemaError:
        return
    # Whatever a decoder accepts must survive its own encoder and decoder unchanged
    # (compared as bytes: a NaN kept in RoundMetrics.extra is not equal to itself).
    again = encode(decoded)
    assert encode(decode(again)) == again


VALID_PAYLOADS = {kind: encode(MAKE[kind]()) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_of_a_valid_message_is_malformed(kind):
    payload = VALID_PAYLOADS[kind]
    for end in range(len(payload)):
        for decode in DECODERS:
            with pytest.raises(SchemaError) as info:
                decode(payload[:end])
            assert info.value.reason in ("malformed", "oversized"), (end, str(info.value))


@pytest.mark.parametrize("kind", KINDS)
def test_every_single_bit_flip_of_a_valid_message_decodes_or_raises_schema_error(kind):
    payload = bytearray(VALID_PAYLOADS[kind])
    for bit in range(len(payload) * 8):
        payload[bit // 8] ^= 1 << (bit % 8)
        decode_with_every_decoder(bytes(payload))
        payload[bit // 8] ^= 1 << (bit % 8)
    assert bytes(payload) == VALID_PAYLOADS[kind]


@FUZZ
@given(data=st.data())
def test_random_bit_flips_and_cuts_of_a_valid_message_decode_or_raise_schema_error(data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    payload = bytearray(VALID_PAYLOADS[kind])
    bits = data.draw(
        st.lists(st.integers(0, len(payload) * 8 - 1), min_size=1, max_size=6), label="bits"
    )
    for bit in bits:
        payload[bit // 8] ^= 1 << (bit % 8)
    end = data.draw(st.integers(0, len(payload)), label="end")
    decode_with_every_decoder(bytes(payload[:end]))
