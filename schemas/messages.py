"""The four message kinds of schema version 1 and their msgpack codecs.

Every message is a msgpack map that starts with ``"v"`` (schema major version) and
``"type"``. Unknown extra keys are ignored, so a minor addition stays readable by old
decoders; an unknown major version is rejected. Decoders raise only ``SchemaError``.
"""

import hashlib
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import msgpack
import numpy as np

from fedmq.schemas.batched import decode_flat_sparse
from fedmq.schemas.encodings import Encoded, decode_encoded, encode_encoded, shape_of, value_problem
from fedmq.schemas.errors import SchemaError
from fedmq.schemas.flat import decode_flat, encode_flat
from fedmq.schemas.tensors import all_finite, decode_tensor, encode_tensor
from fedmq.schemas.topics import validate_name

SCHEMA_VERSION = 1
# Ceiling for any one decoded message unless the caller gives a tighter one. Matches the
# broker's max_packet_size in mosquitto.conf.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ELEMENTS = DEFAULT_MAX_BYTES // 2
# Headroom over a model's float32 numbers for the rest of an update (ids, plan, tensor
# headers: a few hundred bytes in practice).
UPDATE_HEADROOM = 64 * 1024
# Extra room a broker's packet limit leaves for a global model's `selected` list (over
# 14,000 node ids of 64 characters) and MQTT's own header and topic.
PACKET_HEADROOM = 1024 * 1024


def update_bound(num_params: int) -> int:
    """Largest update payload of a model with ``num_params`` parameters that a receiver
    accepts: the dense float32 numbers plus ``UPDATE_HEADROOM``."""
    return 4 * num_params + UPDATE_HEADROOM


def packet_bound(num_params: int) -> int:
    """The broker's ``max_packet_size`` for such a model (``fedmq broker init``): any
    update or global model message fits, and nothing far larger reaches a decoder."""
    return update_bound(num_params) + PACKET_HEADROOM


NODE_STATES = ("online", "training", "submitted", "idle", "done", "offline", "error")
SERVER_STATES = ("waiting", "done", "offline")
CLOSED_BY = ("all_reported", "deadline")

Params = dict[str, np.ndarray]
Layout = dict[str, tuple[int, ...]]


def model_id_of(params: Mapping[str, np.ndarray]) -> str:
    """Content hash of a parameter set: 32 hex digits of SHA-256 over names, dtypes,
    shapes and little-endian bytes in order. Two equal models get the same id."""
    digest = hashlib.sha256()
    for name, array in params.items():
        wire = encode_tensor(array)
        digest.update(f"{name}\0{wire['dtype']}\0{wire['shape']}\0".encode())
        digest.update(wire["data"])
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class TrainingPlan:
    """What each node does with a global model, chosen by the aggregator."""

    learning_rate: float
    batch_size: int
    local_epochs: int
    seed: int
    compression: str = "dense"  # the SPEC nodes compress their deltas with


@dataclass(frozen=True)
class GlobalModel:
    federation: str
    round: int
    model: str
    model_id: str
    params: Params
    plan: TrainingPlan
    final: bool = False
    created_at: float = 0.0
    # The nodes sampled to train this round, sorted; None: every node. Not selected:
    # do not train (the aggregator rejects the update as not_selected).
    selected: tuple[str, ...] | None = None

    def selects(self, node_id: str) -> bool:
        return self.selected is None or node_id in self.selected

    @property
    def layout(self) -> Layout:
        return {name: tuple(array.shape) for name, array in self.params.items()}


@dataclass(frozen=True)
class GlobalDelta:
    """A global model told as the bitwise XOR of its float32 bytes with the previous one's.

    Lossless: a node holding ``base_model_id`` rebuilds the exact parameters (and checks
    the result's model_id). Unchanged bits XOR to zero, so zlib shrinks it a lot when
    updates are sparse.
    """

    federation: str
    round: int
    model: str
    model_id: str
    base_model_id: str
    plan: TrainingPlan
    xor: bytes  # zlib of the XORed little-endian bytes of all tensors, in layout order
    final: bool = False
    created_at: float = 0.0
    selected: tuple[str, ...] | None = None  # as in GlobalModel


def make_global_delta(
    previous: Mapping[str, np.ndarray], model: GlobalModel, base_id: str
) -> GlobalDelta:
    xored = b"".join(
        (_bits(model.params[name]) ^ _bits(previous[name])).tobytes() for name in model.params
    )
    return GlobalDelta(
        federation=model.federation, round=model.round, model=model.model,
        model_id=model.model_id, base_model_id=base_id, plan=model.plan,
        xor=zlib.compress(xored, 6), final=model.final, created_at=model.created_at,
        selected=model.selected,
    )  # fmt: skip


def _bits(array: np.ndarray) -> np.ndarray:
    wire = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    return wire.view(np.dtype(f"<u{wire.dtype.itemsize}"))


def apply_global_delta(base: Mapping[str, np.ndarray], message: GlobalDelta) -> GlobalModel:
    """The full global model from the one it was made against; SchemaError if it does
    not fit ``base`` or the result's hash is not ``model_id``."""
    total = sum(_bits(array).nbytes for array in base.values())
    inflater = zlib.decompressobj()
    try:
        xored = inflater.decompress(message.xor, total)
    except zlib.error as error:
        raise SchemaError("malformed", f"xor is not zlib data: {error}") from None
    if len(xored) != total or inflater.unconsumed_tail or not inflater.eof:
        raise SchemaError("bad_shape", f"xor does not inflate to exactly {total} bytes")
    params: Params = {}
    offset = 0
    for name, array in base.items():
        bits = _bits(array)
        flips = np.frombuffer(xored, dtype=bits.dtype, count=bits.size, offset=offset)
        params[name] = (bits ^ flips.reshape(bits.shape)).view(bits.dtype.str.replace("u", "f"))
        offset += bits.nbytes
    if not all(np.isfinite(a).all() for a in params.values()):
        raise SchemaError("non_finite", "the rebuilt global model holds NaN or Inf")
    if model_id_of(params) != message.model_id:
        raise SchemaError("bad_model_id", "the rebuilt parameters do not hash to model_id")
    return GlobalModel(
        federation=message.federation, round=message.round, model=message.model,
        model_id=message.model_id, params=params, plan=message.plan, final=message.final,
        created_at=message.created_at, selected=message.selected,
    )  # fmt: skip


@dataclass(frozen=True)
class NodeUpdate:
    federation: str
    node_id: str
    round: int
    base_model_id: str
    num_examples: int
    train_loss: float
    train_seconds: float
    delta: Mapping[str, Encoded]  # dense arrays, or quantized/sparse forms
    compression: str = "dense"
    sent_at: float = 0.0


@dataclass(frozen=True)
class NodeStatus:
    federation: str
    node_id: str
    state: str
    round: int | None = None
    model_id: str | None = None
    num_examples: int | None = None
    at: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class ServerStatus:
    federation: str
    state: str
    round: int
    expected_nodes: int
    min_nodes: int
    reported: int
    deadline_seconds: float | None = None
    at: float | None = None


@dataclass(frozen=True)
class RoundMetrics:
    federation: str
    round: int
    model_id: str
    participants: list[str]
    num_examples: int
    accuracy: float | None
    loss: float | None
    train_loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    global_bytes: int
    rejected: dict[str, int]
    seconds: float
    aggregate_seconds: float
    closed_by: str
    at: float = 0.0
    train_seconds_median: float | None = None
    global_delta_bytes: int | None = None
    broker_dropped: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Message = GlobalModel | GlobalDelta | NodeUpdate | NodeStatus | ServerStatus | RoundMetrics


# --------------------------------------------------------------------------- encoding


def _params_to_wire(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: encode_tensor(array) for name, array in params.items()}


def _uses(stage: str, compression: str) -> bool:
    return stage in compression.split("+")


def _delta_to_wire(delta: Mapping[str, Encoded], compression: str) -> Any:
    if _uses("flat", compression):  # one sparse run for the whole delta (schemas.flat)
        wire: Any = encode_flat(delta)
    else:
        wire = {name: encode_encoded(tensor) for name, tensor in delta.items()}
    if _uses("zlib", compression):  # lossless last stage over the whole delta map
        return zlib.compress(msgpack.packb(wire, use_bin_type=True), 9)
    return wire


def _plan_to_wire(plan: TrainingPlan) -> dict[str, Any]:
    return {
        "learning_rate": float(plan.learning_rate),
        "batch_size": plan.batch_size,
        "local_epochs": plan.local_epochs,
        "seed": plan.seed,
        "compression": plan.compression,
    }


def _selected_to_wire(selected: tuple[str, ...] | None) -> dict[str, Any]:
    """Only when sampling: without the key a message is byte for byte what it was."""
    return {} if selected is None else {"selected": list(selected)}


def _to_wire(message: Message) -> dict[str, Any]:
    head: dict[str, Any] = {"v": SCHEMA_VERSION}
    match message:
        case GlobalModel():
            plan = message.plan
            return (
                head
                | {
                    "type": "global",
                    "federation": message.federation,
                    "round": message.round,
                    "model": message.model,
                    "model_id": message.model_id,
                    "final": message.final,
                    "created_at": float(message.created_at),
                    "plan": _plan_to_wire(plan),
                    "params": _params_to_wire(message.params),
                }
                | _selected_to_wire(message.selected)
            )
        case GlobalDelta():
            return (
                head
                | {
                    "type": "global_delta",
                    "federation": message.federation,
                    "round": message.round,
                    "model": message.model,
                    "model_id": message.model_id,
                    "base_model_id": message.base_model_id,
                    "final": message.final,
                    "created_at": float(message.created_at),
                    "plan": _plan_to_wire(message.plan),
                    "xor": message.xor,
                }
                | _selected_to_wire(message.selected)
            )
        case NodeUpdate():
            return head | {
                "type": "update",
                "federation": message.federation,
                "node_id": message.node_id,
                "round": message.round,
                "base_model_id": message.base_model_id,
                "num_examples": message.num_examples,
                "train_loss": float(message.train_loss),
                "train_seconds": float(message.train_seconds),
                "sent_at": float(message.sent_at),
                "compression": message.compression,
                "delta": _delta_to_wire(message.delta, message.compression),
            }
        case NodeStatus():
            return head | {
                "type": "status",
                "federation": message.federation,
                "node_id": message.node_id,
                "state": message.state,
                "round": message.round,
                "model_id": message.model_id,
                "num_examples": message.num_examples,
                "at": message.at,
                "detail": message.detail,
            }
        case ServerStatus():
            return head | {
                "type": "server",
                "federation": message.federation,
                "state": message.state,
                "round": message.round,
                "expected_nodes": message.expected_nodes,
                "min_nodes": message.min_nodes,
                "reported": message.reported,
                "deadline_seconds": message.deadline_seconds,
                "at": message.at,
            }
        case RoundMetrics():
            known = head | {
                "type": "metrics",
                "federation": message.federation,
                "round": message.round,
                "model_id": message.model_id,
                "participants": list(message.participants),
                "num_examples": message.num_examples,
                "accuracy": message.accuracy,
                "loss": message.loss,
                "train_loss": message.train_loss,
                "uplink_bytes": message.uplink_bytes,
                "downlink_bytes": message.downlink_bytes,
                "global_bytes": message.global_bytes,
                "rejected": dict(message.rejected),
                "seconds": float(message.seconds),
                "aggregate_seconds": float(message.aggregate_seconds),
                "closed_by": message.closed_by,
                "at": float(message.at),
                "train_seconds_median": message.train_seconds_median,
                "global_delta_bytes": message.global_delta_bytes,
                "broker_dropped": message.broker_dropped,
            }
            return known | {k: v for k, v in message.extra.items() if k not in known}
    raise TypeError(f"not a fedmq message: {type(message).__name__}")


def encode(message: Message) -> bytes:
    """msgpack bytes of a message (floats as float64, bytes as bin)."""
    return msgpack.packb(_to_wire(message), use_bin_type=True)


# --------------------------------------------------------------------------- decoding

T = TypeVar("T")
_MISSING = object()


def _unpackb(data: bytes | bytearray | memoryview, what: str) -> Any:
    """msgpack with every length capped by the input's size, no ext types, str keys only."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(data),
            max_str_len=len(data),
            max_array_len=len(data),
            max_map_len=len(data),
            max_ext_len=0,
            use_list=True,
        )
    except Exception as error:  # msgpack raises a zoo of types; all mean the same here
        raise SchemaError("malformed", f"{what}: {error}") from None


def _unpack(payload: Any, kind: str, max_bytes: int) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise SchemaError("malformed", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise SchemaError("oversized", f"{len(payload)} bytes is more than the {max_bytes} allowed")
    obj = _unpackb(payload, "not valid msgpack")
    if not isinstance(obj, dict):
        raise SchemaError("malformed", f"message must be a map, got {type(obj).__name__}")
    version = obj.get("v", _MISSING)
    if version is _MISSING or version is None:
        raise SchemaError("bad_field", "v (schema version) is missing")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise SchemaError(
            "unsupported_version",
            f"schema version {version!r}; this decoder reads {SCHEMA_VERSION}",
        )
    if obj.get("type") != kind:
        raise SchemaError("wrong_type", f"type is {obj.get('type')!r}, expected {kind!r}")
    return obj


def _get(obj: Mapping[str, Any], key: str, kind: type[T], *, optional: bool = False) -> T:
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if optional:
            return None  # type: ignore[return-value]
        raise SchemaError("bad_field", f"{key} is missing")
    if kind is float:
        if type(value) not in (int, float):
            raise SchemaError("bad_field", f"{key} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise SchemaError("non_finite", f"{key} is {value}")
        return float(value)  # type: ignore[return-value]
    if kind is int and type(value) is not int:
        raise SchemaError("bad_field", f"{key} must be an integer, got {type(value).__name__}")
    if not isinstance(value, kind):
        raise SchemaError("bad_field", f"{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _name(obj: Mapping[str, Any], key: str) -> str:
    value = _get(obj, key, str)
    try:
        return validate_name(key, value)
    except ValueError as error:
        raise SchemaError("bad_field", str(error)) from None


def _positive(obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    value = _get(obj, key, int)
    if value < minimum:
        raise SchemaError("bad_field", f"{key} is {value}, must be at least {minimum}")
    return value


MAX_EXAMPLES = 2**24  # FedAvg weights stay exact in float32 up to here


def _examples(obj: Mapping[str, Any]) -> int:
    value = _positive(obj, "num_examples", minimum=1)
    if value > MAX_EXAMPLES:
        raise SchemaError("bad_field", f"num_examples {value} is more than {MAX_EXAMPLES}")
    return value


# Reported training losses are saturated to +-MAX_LOSS when decoded: beyond it they say
# no more than "diverging", and their example-weighted sum over a round could overflow
# float64. They are not rejected: an honest node whose model was driven far off (say by
# a poisoned round) must still be heard, or its rounds stall.
MAX_LOSS = 1e12


def _saturated(obj: Mapping[str, Any], key: str, limit: float) -> float:
    value = _get(obj, key, float)
    return max(-limit, min(limit, value))


def _positive_float(obj: Mapping[str, Any], key: str) -> float:
    value = _get(obj, key, float)
    if not value > 0:
        raise SchemaError("bad_field", f"{key} is {value}, must be > 0")
    return value


def _model_id(obj: Mapping[str, Any], key: str) -> str:
    value = _get(obj, key, str)
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
        raise SchemaError("bad_field", f"{key} must be 32 lowercase hex digits")
    return value


_SPEC = re.compile(r"[a-z0-9:.+]{1,64}")  # shape only; fedmq.compression parses it
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # node and federation ids, as in schemas.topics
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")


def _check_names(wire: Mapping[Any, Any], key: str) -> None:
    bad = [n for n in wire if not (isinstance(n, str) and _TENSOR_NAME.fullmatch(n))]
    if bad:
        raise SchemaError("bad_field", f"{key} has invalid tensor names {bad[:3]!r}")


def _params(
    obj: Mapping[str, Any],
    key: str,
    *,
    max_elements: int,
    layout: Layout | None,
    dtype: str | None = None,
) -> Params:
    wire = _get(obj, key, dict)
    if not wire:
        raise SchemaError("bad_field", f"{key} holds no tensors")
    _check_names(wire, key)
    if layout is not None and list(wire) != list(layout):
        raise SchemaError(
            "layout_mismatch", f"{key} has tensors {list(wire)}, the model has {list(layout)}"
        )
    params: Params = {}
    budget = max_elements
    for name, tensor in wire.items():
        array = decode_tensor(tensor, f"{key}.{name}", max_elements=budget)
        budget -= array.size
        if layout is not None and tuple(array.shape) != layout[name]:
            raise SchemaError(
                "layout_mismatch",
                f"{key}.{name} has shape {tuple(array.shape)}, the model has {layout[name]}",
            )
        if dtype is not None and array.dtype.str != dtype:
            raise SchemaError("bad_dtype", f"{key}.{name} is {array.dtype.str}, expected {dtype}")
        params[name] = array
    bad = all_finite(params)
    if bad is not None:
        raise SchemaError("non_finite", f"{key}.{bad} holds NaN or Inf")
    return params


def decode_global(
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> GlobalModel:
    """Decode and check a global model; its model_id must match its parameters."""
    obj = _unpack(payload, "global", max_bytes)
    decoded = GlobalModel(
        federation=_name(obj, "federation"),
        round=_positive(obj, "round", minimum=1),
        model=_get(obj, "model", str),
        model_id=_model_id(obj, "model_id"),
        final=_get(obj, "final", bool),
        created_at=_get(obj, "created_at", float),
        plan=_plan(obj),
        params=_params(obj, "params", max_elements=max_elements, layout=None),
        selected=_optional(obj, "selected", _node_ids),
    )
    if model_id_of(decoded.params) != decoded.model_id:
        raise SchemaError("bad_model_id", "model_id does not match the hash of params")
    return decoded


def _plan(obj: Mapping[str, Any]) -> TrainingPlan:
    plan = _get(obj, "plan", dict)
    return TrainingPlan(
        learning_rate=_positive_float(plan, "learning_rate"),
        batch_size=_positive(plan, "batch_size", minimum=1),
        local_epochs=_positive(plan, "local_epochs", minimum=1),
        seed=_positive(plan, "seed"),
        compression=_spec(plan, default="dense"),
    )


def decode_global_delta(payload: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> GlobalDelta:
    """Decode the compact global; ``apply_global_delta`` rebuilds and checks the model."""
    obj = _unpack(payload, "global_delta", max_bytes)
    return GlobalDelta(
        federation=_name(obj, "federation"),
        round=_positive(obj, "round", minimum=1),
        model=_get(obj, "model", str),
        model_id=_model_id(obj, "model_id"),
        base_model_id=_model_id(obj, "base_model_id"),
        final=_get(obj, "final", bool),
        created_at=_get(obj, "created_at", float),
        plan=_plan(obj),
        xor=_get(obj, "xor", bytes),
        selected=_optional(obj, "selected", _node_ids),
    )


def decode_update(
    payload: bytes,
    *,
    layout: Layout | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> NodeUpdate:
    """Decode and check a node update; with ``layout`` the delta must match it exactly."""
    obj = _unpack(payload, "update", max_bytes)
    compression = _spec(obj)
    train_seconds = _get(obj, "train_seconds", float)
    if train_seconds < 0:
        raise SchemaError("bad_field", "train_seconds is negative")
    return NodeUpdate(
        federation=_name(obj, "federation"),
        node_id=_name(obj, "node_id"),
        round=_positive(obj, "round", minimum=1),
        base_model_id=_model_id(obj, "base_model_id"),
        num_examples=_examples(obj),
        train_loss=_saturated(obj, "train_loss", MAX_LOSS),
        train_seconds=train_seconds,
        sent_at=_get(obj, "sent_at", float),
        compression=compression,
        delta=_delta(
            obj, compression, max_bytes=max_bytes, max_elements=max_elements, layout=layout
        ),
    )


def _spec(obj: Mapping[str, Any], default: str | None = None) -> str:
    value = (
        obj.get("compression", default) if default is not None else _get(obj, "compression", str)
    )
    if not isinstance(value, str) or not _SPEC.fullmatch(value):
        raise SchemaError("bad_field", f"compression {value!r} is not a SPEC")
    return value


def _delta(
    obj: Mapping[str, Any],
    compression: str,
    *,
    max_bytes: int,
    max_elements: int,
    layout: Layout | None,
) -> Mapping[str, Encoded]:
    wire = obj.get("delta")
    if _uses("zlib", compression):
        if not isinstance(wire, bytes):
            raise SchemaError("bad_field", "delta must be zlib bytes with compression +zlib")
        inflater = zlib.decompressobj()
        try:
            packed = inflater.decompress(wire, max_bytes)
        except zlib.error as error:
            raise SchemaError("malformed", f"delta is not zlib data: {error}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise SchemaError("oversized", f"delta inflates beyond {max_bytes} bytes or is cut")
        wire = _unpackb(packed, "inflated delta is not msgpack")
    if _uses("flat", compression):
        return decode_flat(wire, layout, max_elements=max_elements)
    if not isinstance(wire, dict) or not wire:
        raise SchemaError("bad_field", "delta must be a non-empty map of tensors")
    _check_names(wire, "delta")
    if layout is not None and list(wire) != list(layout):
        raise SchemaError(
            "layout_mismatch", f"delta has tensors {list(wire)}, the model has {list(layout)}"
        )
    if layout is not None:  # the usual case at 100x: all tensors in one pass
        flat = decode_flat_sparse(wire, layout, max_elements)
        if flat is not None:
            return flat
    delta: dict[str, Encoded] = {}
    budget = max_elements
    for name, tensor in wire.items():
        decoded = decode_encoded(tensor, f"delta.{name}", max_elements=max(budget, 0))
        budget -= math.prod(shape_of(decoded))
        if layout is not None and shape_of(decoded) != layout[name]:
            raise SchemaError(
                "layout_mismatch",
                f"delta.{name} has shape {shape_of(decoded)}, the model has {layout[name]}",
            )
        problem = value_problem(decoded)
        if problem is not None:
            raise SchemaError(problem, f"delta.{name} holds NaN, Inf or a value beyond 1e15")
        delta[name] = decoded
    return delta


def _choice(obj: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _get(obj, key, str)
    if value not in choices:
        raise SchemaError("bad_field", f"{key} {value!r} is not one of {list(choices)}")
    return value


def decode_status(payload: bytes, *, max_bytes: int = 64 * 1024) -> NodeStatus:
    obj = _unpack(payload, "status", max_bytes)
    return NodeStatus(
        federation=_name(obj, "federation"),
        node_id=_name(obj, "node_id"),
        state=_choice(obj, "state", NODE_STATES),
        round=_optional(obj, "round", _positive),
        model_id=_optional(obj, "model_id", _model_id),
        num_examples=_optional(obj, "num_examples", _positive),
        at=_get(obj, "at", float, optional=True),
        detail=_get(obj, "detail", str, optional=True),
    )


def _optional(obj: Mapping[str, Any], key: str, check: Callable[..., T]) -> T | None:
    return None if obj.get(key) is None else check(obj, key)


def _node_ids(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A sorted list of distinct node ids."""
    ids = _get(obj, key, list)
    if not all(isinstance(i, str) and _ID.fullmatch(i) for i in ids):
        raise SchemaError("bad_field", f"{key} must be a list of node ids")
    if not ids or ids != sorted(set(ids)):
        raise SchemaError("bad_field", f"{key} must be sorted, without repeats, not empty")
    return tuple(ids)


def decode_server_status(payload: bytes, *, max_bytes: int = 64 * 1024) -> ServerStatus:
    obj = _unpack(payload, "server", max_bytes)
    status = ServerStatus(
        federation=_name(obj, "federation"),
        state=_choice(obj, "state", SERVER_STATES),
        round=_positive(obj, "round"),
        expected_nodes=_positive(obj, "expected_nodes"),
        min_nodes=_positive(obj, "min_nodes"),
        reported=_positive(obj, "reported"),
        deadline_seconds=_get(obj, "deadline_seconds", float, optional=True),
        at=_get(obj, "at", float, optional=True),
    )
    if status.min_nodes > status.expected_nodes:
        raise SchemaError("bad_field", "min_nodes is more than expected_nodes")
    return status


# Keys decoded into RoundMetrics fields; any other key is kept in ``extra``.
_METRICS_KEYS = {"v", "type"} | {f.name for f in fields(RoundMetrics)} - {"extra"}


def decode_metrics(payload: bytes, *, max_bytes: int = 16 * 1024 * 1024) -> RoundMetrics:
    obj = _unpack(payload, "metrics", max_bytes)
    participants = _get(obj, "participants", list)
    if not all(isinstance(p, str) and _ID.fullmatch(p) for p in participants):
        raise SchemaError("bad_field", "participants must be a list of node ids")
    rejected = _get(obj, "rejected", dict)
    if not all(type(count) is int and count >= 0 for count in rejected.values()):
        raise SchemaError("bad_field", "rejected must map reasons to counts")
    return RoundMetrics(
        federation=_name(obj, "federation"),
        round=_positive(obj, "round", minimum=1),
        model_id=_model_id(obj, "model_id"),
        participants=participants,
        num_examples=_positive(obj, "num_examples"),
        accuracy=_get(obj, "accuracy", float, optional=True),
        loss=_get(obj, "loss", float, optional=True),
        train_loss=_get(obj, "train_loss", float, optional=True),
        uplink_bytes=_positive(obj, "uplink_bytes"),
        downlink_bytes=_positive(obj, "downlink_bytes"),
        global_bytes=_positive(obj, "global_bytes"),
        rejected=rejected,
        seconds=_get(obj, "seconds", float),
        aggregate_seconds=_get(obj, "aggregate_seconds", float),
        closed_by=_choice(obj, "closed_by", CLOSED_BY),
        at=_get(obj, "at", float),
        train_seconds_median=_get(obj, "train_seconds_median", float, optional=True),
        global_delta_bytes=_optional(obj, "global_delta_bytes", _positive),
        broker_dropped=_optional(obj, "broker_dropped", _positive),
        extra={k: v for k, v in obj.items() if k not in _METRICS_KEYS},
    )
