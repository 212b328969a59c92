"""The four message kinds of schema version 1 and their msgpack codecs.

Every message is a msgpack map that starts with ``"v"`` (schema major version) and
``"type"``. Unknown extra keys are ignored, so a minor addition stays readable by old
decoders; an unknown major version is rejected. Decoders raise only ``SchemaError``.

Each kind is declared once, as a ``Kind``: its fields in wire order, each with its check
and its encoder; ``encode`` and the decoders follow it, and tests/unit/test_protocol_doc.py
holds docs/PROTOCOL.md section 8's tables to it.
"""

import functools
import hashlib
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from functools import partial
from operator import attrgetter
from typing import Any, TypeVar

import msgpack
import numpy as np

from fedmq.schemas.batched import decode_flat_dense, decode_flat_sparse
from fedmq.schemas.encodings import (
    Encoded,
    decode_encoded,
    encode_encoded,
    shape_of,
    to_dense,
    value_problem,
)
from fedmq.schemas.errors import SchemaError
from fedmq.schemas.flat import decode_flat, encode_flat
from fedmq.schemas.framing import Framing
from fedmq.schemas.tensors import Params, Shapes, all_finite, decode_tensor, encode_tensor
from fedmq.schemas.topics import is_name, validate_name

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
# buffer_full: the asynchronous buffer held its K updates (docs/PROTOCOL.md 8.5).
CLOSED_BY = ("all_reported", "deadline", "buffer_full")
MODES = ("sync", "async")  # how the aggregator makes versions (plan.mode)


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
class DpSgd:
    """Example-level differential privacy on the nodes (DP-SGD, Abadi et al. 2016): each
    step clips every example's gradient to L2 norm ``clip`` over all parameters, sums,
    adds Gaussian noise of standard deviation ``noise * clip`` and divides by the expected
    batch size; batches are Poisson samples (docs/PROTOCOL.md 8.1)."""

    noise: float  # the noise multiplier Z: standard deviation over clip
    clip: float  # C, the L2 bound of one example's gradient


@dataclass(frozen=True)
class TrainingPlan:
    """What each node does with a global model, chosen by the aggregator."""

    learning_rate: float
    batch_size: int
    local_epochs: int
    seed: int
    compression: str = "dense"  # the SPEC nodes compress their deltas with
    # The fraction of its examples each node holds out to evaluate the global model it
    # receives (federated evaluation); 0: none. Written only when non-zero.
    eval_fraction: float = 0.0
    # FedProx (Li et al. 2020): nodes add (proximal_mu / 2) * ||w - w_global||^2 to the
    # task's loss while training; 0: plain local training. Written only when non-zero.
    proximal_mu: float = 0.0
    # How versions are made: "sync" rounds, or "async" buffered aggregation, where a
    # node may skip versions (its error-feedback residual carries over). Written only
    # when async.
    mode: str = "sync"
    # Example-level DP-SGD on every node; None: plain training. Written only when set.
    dp_sgd: DpSgd | None = None


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
    # The task's declared version and the fingerprint of its layout (fedmq.tasks.layout):
    # a node checks its own task against them. None from aggregators before issue 13.
    task_version: str | None = None
    task_fingerprint: str | None = None

    def selects(self, node_id: str) -> bool:
        return self.selected is None or node_id in self.selected

    @property
    def layout(self) -> Shapes:
        return {name: tuple(array.shape) for name, array in self.params.items()}


@dataclass(frozen=True)
class GlobalDelta:
    """A global model told as its difference from the previous one, in one of two forms.

    ``xor`` (lossless): the bitwise XOR of its float32 bytes with the previous one's,
    deflated; a node holding ``base_model_id`` rebuilds the exact parameters (and checks
    the result's model_id). Unchanged bits XOR to zero, so zlib shrinks it a lot when
    updates are sparse.

    ``delta`` (with ``compression``, the aggregator's --downlink-compression): the
    compressed float32 difference, in an update's wire form; the model *is* the base plus
    its dense values in float32 (``add_delta``), so every node rebuilds the same bits.
    ``xor`` is then empty (an older node fails to rebuild it and fetches the full model).
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
    task_version: str | None = None  # as in GlobalModel
    task_fingerprint: str | None = None  # as in GlobalModel
    # The compressed form (--downlink-compression): its SPEC, and the delta as it travels
    # (a map of tensors, a flat map, or bin with +zlib; decoded against the base when
    # applied). None: the xor form.
    compression: str | None = None
    delta: Any = None
    # Round 1 of a run with --downlink-compression: the seed the model is the task's
    # initial parameters of (``fedmq.tasks.initial``); a node builds them itself and checks
    # them against model_id. Then ``base_model_id`` is ``model_id`` (there is no base),
    # ``xor`` is empty and ``compression``/``delta`` are absent. None: another form.
    init_seed: int | None = None


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
        selected=model.selected, task_version=model.task_version,
        task_fingerprint=model.task_fingerprint,
    )  # fmt: skip


def make_compressed_global_delta(
    model: GlobalModel, base_id: str, compression: str, wire: Any
) -> GlobalDelta:
    """The compact form of ``model`` as ``compression`` (a canonical SPEC) with ``wire``
    its compressed delta from the base as it travels (``delta_to_wire``); ``model.params``
    must be ``add_delta(base, the delta)``."""
    return GlobalDelta(
        federation=model.federation, round=model.round, model=model.model,
        model_id=model.model_id, base_model_id=base_id, plan=model.plan, xor=b"",
        final=model.final, created_at=model.created_at, selected=model.selected,
        task_version=model.task_version, task_fingerprint=model.task_fingerprint,
        compression=compression, delta=wire,
    )  # fmt: skip


def make_init_global_delta(model: GlobalModel, seed: int) -> GlobalDelta:
    """The compact form of a run's first model, ``model.params`` being the task's initial
    parameters from ``seed``: nothing but the seed travels (``init_seed``)."""
    return GlobalDelta(
        federation=model.federation, round=model.round, model=model.model,
        model_id=model.model_id, base_model_id=model.model_id, plan=model.plan, xor=b"",
        final=model.final, created_at=model.created_at, selected=model.selected,
        task_version=model.task_version, task_fingerprint=model.task_fingerprint,
        init_seed=seed,
    )  # fmt: skip


def add_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, Encoded]) -> Params:
    """``base`` plus the dense float32 values of ``delta``, tensor by tensor in float32,
    cast back to each base tensor's dtype: how the aggregator makes a model from its
    compressed downlink and how every node rebuilds it (one function, the same bits)."""
    return {
        name: np.asarray(
            np.add(np.asarray(array, np.float32), to_dense(delta[name]), dtype=np.float32),
            dtype=array.dtype,
        )
        for name, array in base.items()
    }


def delta_to_wire(delta: Mapping[str, Encoded], compression: str) -> Any:
    """A compressed delta as it travels, framed as ``compression`` says (flat, zlib)."""
    framing = Framing.named_by(compression)
    if framing.flat:  # one sparse run for the whole delta (schemas.flat)
        wire: Any = encode_flat(delta)
    else:
        wire = {name: encode_encoded(tensor) for name, tensor in delta.items()}
    if framing.zlib:  # lossless last stage over the whole delta map
        return zlib.compress(msgpack.packb(wire, use_bin_type=True), 9)
    return wire


def delta_from_wire(
    wire: Any, compression: str, layout: Shapes, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Mapping[str, Encoded]:
    """``delta_to_wire`` read back, checked against ``layout`` as an update's delta is."""
    return _delta(
        {"delta": wire},
        Framing.named_by(compression),
        max_bytes=max_bytes,
        max_elements=sum(math.prod(shape) for shape in layout.values()),
        layout=layout,
    )


def _bits(array: np.ndarray) -> np.ndarray:
    wire = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    return wire.view(np.dtype(f"<u{wire.dtype.itemsize}"))


def apply_global_delta(base: Mapping[str, np.ndarray], message: GlobalDelta) -> GlobalModel:
    """The full global model from the one it was made against; SchemaError if it does
    not fit ``base`` or the result's hash is not ``model_id``. The ``init_seed`` form has
    no base: a node builds it from its task (``fedmq.tasks.initial``)."""
    if message.init_seed is not None:
        raise SchemaError("bad_field", "an init_seed form is built from the task, not applied")
    if message.delta is not None:
        params = _apply_compressed(base, message)
    else:
        params = _apply_xor(base, message)
    if not all(np.isfinite(a).all() for a in params.values()):
        raise SchemaError("non_finite", "the rebuilt global model holds NaN or Inf")
    if model_id_of(params) != message.model_id:
        raise SchemaError("bad_model_id", "the rebuilt parameters do not hash to model_id")
    return _model_of(message, params)


def initial_global(message: GlobalDelta, params: Mapping[str, np.ndarray]) -> GlobalModel:
    """The global model an ``init_seed`` form carries, ``params`` being what the node built
    from the seed; SchemaError ``bad_model_id`` (naming both ids) if they hash otherwise."""
    params = {name: np.asarray(array) for name, array in params.items()}
    built = model_id_of(params)
    if built != message.model_id:
        raise SchemaError(
            "bad_model_id",
            f"the task's initial parameters from seed {message.init_seed} hash to {built}, "
            f"the aggregator's to {message.model_id}",
        )
    return _model_of(message, params)


def _model_of(message: GlobalDelta, params: Params) -> GlobalModel:
    return GlobalModel(
        federation=message.federation, round=message.round, model=message.model,
        model_id=message.model_id, params=params, plan=message.plan, final=message.final,
        created_at=message.created_at, selected=message.selected,
        task_version=message.task_version, task_fingerprint=message.task_fingerprint,
    )  # fmt: skip


def _apply_compressed(base: Mapping[str, np.ndarray], message: GlobalDelta) -> Params:
    if message.compression is None:
        raise SchemaError("bad_field", "a global_delta with delta needs compression")
    layout = {name: tuple(array.shape) for name, array in base.items()}
    return add_delta(base, delta_from_wire(message.delta, message.compression, layout))


def _apply_xor(base: Mapping[str, np.ndarray], message: GlobalDelta) -> Params:
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
    return params


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
    # Federated evaluation (plan.eval_fraction > 0): the task's metrics of the RECEIVED
    # global model on the node's held-out examples, and how many there were. Both or neither.
    metrics: dict[str, float] | None = None
    eval_examples: int | None = None
    # DP-SGD (plan.dp_sgd): the epsilon the node has spent in all, this update included,
    # at its delta (its privacy ledger, docs/PROTOCOL.md 13.2). Both or neither.
    dp_epsilon: float | None = None
    dp_delta: float | None = None


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
    # The epsilon spent by the node's privacy ledger so far, at its delta; set once the
    # node has spent any (DP-SGD, plan.dp_sgd).
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    # Payload bytes this node process received on the global topics since it started
    # (both forms, catch-ups included); None: not counted (older nodes, the last will).
    received_bytes: int | None = None

    @property
    def through_with_final(self) -> bool:
        """The node is through with the run's final model (docs/PROTOCOL.md 8.3): ``done``,
        ``idle`` without a round (the run it found had finished) or ``error`` (it cannot
        use the model); its ``received_bytes`` then include the final model's delivery."""
        return self.state in ("done", "error") or (self.state == "idle" and self.round is None)


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
    # In ``done`` only, once the aggregator has counted them (docs/PROTOCOL.md 8.4): the
    # payload bytes the nodes reported receiving on the global topics after the final
    # model was published (None: no node reported), and how many nodes' reports that is.
    final_downlink_delivered: int | None = None
    final_downlink_nodes: int | None = None

    @property
    def final_count(self) -> tuple[int | None, int] | None:
        """The final model's delivery this status carries, (bytes, nodes), or None: only a
        ``done`` that has counted it (docs/PROTOCOL.md 8.4)."""
        if self.state != "done" or self.final_downlink_nodes is None:
            return None
        return self.final_downlink_delivered, self.final_downlink_nodes


@dataclass(frozen=True)
class RoundEvaluation:
    """A round's metrics by where they were measured. ``central``: the NEW model on the
    aggregator's test set (None without one). ``federated``: the model the round STARTED
    from, on the participants' held-out examples, their metrics weighted by
    ``eval_examples`` (None when no update carried metrics)."""

    central: dict[str, float] | None = None
    federated: dict[str, float] | None = None


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
    metrics: RoundEvaluation | None = None  # None: an aggregator before federated evaluation
    elapsed: float | None = None  # seconds since the run started; None: an older aggregator
    # Payload bytes the nodes reported receiving on the global topics while this round was
    # open (NodeStatus.received_bytes); None: no node reported a count.
    downlink_delivered: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Message = GlobalModel | GlobalDelta | NodeUpdate | NodeStatus | ServerStatus | RoundMetrics


# --------------------------------------------------------------------------- checks
# Each check reads one key of a decoded map, ``check(obj, key) -> value``, and raises
# SchemaError naming the key.

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


# Checks of one msgpack type. The valid case returns at once (the decoder is on the
# aggregator's hot path); anything else goes through _get, which words the error.


def _float(obj: Mapping[str, Any], key: str) -> float:
    value = obj.get(key)
    if type(value) is float and math.isfinite(value):
        return value
    return _get(obj, key, float)


def _of_type(kind: type[T]) -> Callable[[Mapping[str, Any], str], T]:
    def check(obj: Mapping[str, Any], key: str) -> T:
        value = obj.get(key)
        return value if type(value) is kind else _get(obj, key, kind)

    return check


_str, _bool, _bin = _of_type(str), _of_type(bool), _of_type(bytes)


def _name(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if type(value) is str and is_name(value):
        return value
    value = _str(obj, key)
    try:
        return validate_name(key, value)
    except ValueError as error:
        raise SchemaError("bad_field", str(error)) from None


def _positive(obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    value = obj.get(key)
    if type(value) is int and value >= minimum:
        return value
    value = _get(obj, key, int)
    if value < minimum:
        raise SchemaError("bad_field", f"{key} is {value}, must be at least {minimum}")
    return value


def _at_least_1(obj: Mapping[str, Any], key: str) -> int:
    return _positive(obj, key, minimum=1)


MAX_EXAMPLES = 2**24  # FedAvg weights stay exact in float32 up to here


def _examples(obj: Mapping[str, Any], key: str) -> int:
    value = _positive(obj, key, minimum=1)
    if value > MAX_EXAMPLES:
        raise SchemaError("bad_field", f"{key} {value} is more than {MAX_EXAMPLES}")
    return value


# Reported training losses are saturated to +-MAX_LOSS when decoded: beyond it they say
# no more than "diverging", and their example-weighted sum over a round could overflow
# float64. They are not rejected: an honest node whose model was driven far off (say by
# a poisoned round) must still be heard, or its rounds stall.
MAX_LOSS = 1e12


def _saturated(obj: Mapping[str, Any], key: str, limit: float = MAX_LOSS) -> float:
    value = obj.get(key)
    if type(value) is float and -limit <= value <= limit:  # as the clamp would leave it
        return value
    value = _float(obj, key)
    return max(-limit, min(limit, value))


def _positive_float(obj: Mapping[str, Any], key: str) -> float:
    value = _float(obj, key)
    if not value > 0:
        raise SchemaError("bad_field", f"{key} is {value}, must be > 0")
    return value


def _non_negative_float(obj: Mapping[str, Any], key: str) -> float:
    value = _float(obj, key)
    if value < 0:
        raise SchemaError("bad_field", f"{key} is negative")
    return value


_MODEL_ID = re.compile("[0-9a-f]{32}")  # one regex: a character loop cost ~10 us an update
# The string checks below remember their last answers, as schemas.topics.is_name does:
# the same model ids, SPEC and tensor names come in every update of a round. Only short
# strings (a longer one fails the regex anyway) and a bounded number of them.
_REMEMBERED = 64


@functools.lru_cache(maxsize=_REMEMBERED)
def _is_model_id(value: str) -> bool:
    return _MODEL_ID.fullmatch(value) is not None


def _model_id(obj: Mapping[str, Any], key: str) -> str:
    value = _str(obj, key)
    if len(value) != 32 or not _is_model_id(value):
        raise SchemaError("bad_field", f"{key} must be 32 lowercase hex digits")
    return value


MAX_TASK_VERSION = 256  # characters of a task's declared version


def _task_version(obj: Mapping[str, Any], key: str) -> str:
    value = _str(obj, key)
    if len(value) > MAX_TASK_VERSION:
        raise SchemaError("bad_field", f"{key} is longer than {MAX_TASK_VERSION} characters")
    return value


_SPEC = re.compile(r"[a-z0-9:.+]{1,64}")  # shape only; fedmq.compression parses it
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # node and federation ids, as in schemas.topics
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")


@functools.lru_cache(maxsize=_REMEMBERED)
def _is_spec(value: str) -> bool:
    return _SPEC.fullmatch(value) is not None


def _spec(obj: Mapping[str, Any], key: str = "compression", default: str | None = None) -> str:
    value = obj.get(key, default)
    if type(value) is str and len(value) <= 64 and _is_spec(value):
        return value
    value = obj.get(key, default) if default is not None else _get(obj, key, str)
    # here only what the quick path above refused: a str subclass, a long or bad one
    if not isinstance(value, str) or not _SPEC.fullmatch(value):
        raise SchemaError("bad_field", f"{key} {value!r} is not a SPEC")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Mapping[str, Any], str], str]:
    def check(obj: Mapping[str, Any], key: str) -> str:
        value = _get(obj, key, str)
        if value not in choices:
            raise SchemaError("bad_field", f"{key} {value!r} is not one of {list(choices)}")
        return value

    return check


def _id_list(obj: Mapping[str, Any], key: str) -> list[str]:
    ids = _get(obj, key, list)
    if not all(isinstance(i, str) and _ID.fullmatch(i) for i in ids):
        raise SchemaError("bad_field", f"{key} must be a list of node ids")
    return ids


def _node_ids(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A sorted list of distinct node ids."""
    ids = _id_list(obj, key)
    if not ids or ids != sorted(set(ids)):
        raise SchemaError("bad_field", f"{key} must be sorted, without repeats, not empty")
    return tuple(ids)


def _counts(obj: Mapping[str, Any], key: str) -> dict[str, int]:
    counts = _get(obj, key, dict)
    if not all(type(count) is int and count >= 0 for count in counts.values()):
        raise SchemaError("bad_field", f"{key} must map reasons to counts")
    return counts


def _check_names(wire: Mapping[Any, Any], key: str) -> None:
    bad = [n for n in wire if not (isinstance(n, str) and _TENSOR_NAME.fullmatch(n))]
    if bad:
        raise SchemaError("bad_field", f"{key} has invalid tensor names {bad[:3]!r}")


@functools.lru_cache(maxsize=_REMEMBERED)
def _layout_names_ok(names: tuple[str, ...]) -> bool:
    """Whether a layout's tensor names pass ``_check_names`` (asked only of the layouts
    a decoder is given, so the cache holds the aggregator's model's names)."""
    try:
        _check_names(dict.fromkeys(names), "layout")
    except SchemaError:
        return False
    return True


# Federated evaluation (docs/PROTOCOL.md 8.1, 8.2, 8.5).
MAX_EVAL_FRACTION = 0.5  # a node trains on at least as many examples as it holds out
MAX_METRICS = 32  # names in one metrics map


def _eval_fraction(obj: Mapping[str, Any], key: str) -> float:
    """A missing key is 0 (an aggregator before federated evaluation); nil is not."""
    if key not in obj:
        return 0.0
    value = _float(obj, key)
    if not 0.0 <= value <= MAX_EVAL_FRACTION:
        raise SchemaError("bad_field", f"{key} is {value}, must be in [0, {MAX_EVAL_FRACTION}]")
    return value


def _proximal_mu(obj: Mapping[str, Any], key: str) -> float:
    """A missing key is 0 (an aggregator before FedProx); nil is not."""
    if key not in obj:
        return 0.0
    value = _float(obj, key)
    if value < 0.0:
        raise SchemaError("bad_field", f"{key} is {value}, must be >= 0")
    return value


def _mode(obj: Mapping[str, Any], key: str) -> str:
    """A missing key is sync (an aggregator before asynchronous mode)."""
    if key not in obj:
        return "sync"
    return _choice(MODES)(obj, key)


DP_SGD_KEYS = frozenset({"noise", "clip"})


def _dp_sgd(obj: Mapping[str, Any], key: str) -> DpSgd:
    """A map of ``noise`` and ``clip``, both finite and > 0. Unlike anywhere else, an
    unknown key in it is refused (``bad_field``): a node must not train without a privacy
    requirement it does not understand (docs/PROTOCOL.md section 4)."""
    value = _get(obj, key, dict)
    unknown = sorted(str(k) for k in value if k not in DP_SGD_KEYS)
    if unknown:
        raise SchemaError(
            "bad_field", f"{key} has keys {unknown} this node does not know: it will not train"
        )
    return DpSgd(**DP_SGD.decode(value))


def _epsilon(obj: Mapping[str, Any], key: str) -> float:
    return _non_negative_float(obj, key)


def _metric_values(obj: Mapping[str, Any], key: str) -> dict[str, float]:
    """A non-empty map of at most MAX_METRICS names (tensor-name characters) to finite
    numbers, saturated to +-MAX_LOSS as a training loss is."""
    metrics = _get(obj, key, dict)
    if not metrics or len(metrics) > MAX_METRICS:
        raise SchemaError("bad_field", f"{key} must hold 1 to {MAX_METRICS} metrics")
    bad = [n for n in metrics if not (isinstance(n, str) and _TENSOR_NAME.fullmatch(n))]
    if bad:
        raise SchemaError("bad_field", f"{key} has invalid metric names {bad[:3]!r}")
    return {name: _saturated(metrics, name) for name in metrics}


def finite_metrics(values: Mapping[str, Any]) -> dict[str, float] | None:
    """``values`` as a metrics map the wire takes: the finite ones as floats (a diverged
    model's NaN loss is left out), None if none is. Senders filter with it."""
    kept = {
        name: float(value)
        for name, value in values.items()
        if value is not None and math.isfinite(value)
    }
    return kept or None


def _float_map(values: Mapping[str, Any] | None) -> dict[str, float] | None:
    return None if values is None else {name: float(v) for name, v in values.items()}


def _params(
    obj: Mapping[str, Any],
    key: str,
    *,
    max_elements: int,
    layout: Shapes | None,
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


def _delta(
    obj: Mapping[str, Any],
    framing: Framing,
    *,
    max_bytes: int,
    max_elements: int,
    layout: Shapes | None,
) -> Mapping[str, Encoded]:
    wire = obj.get("delta")
    if framing.zlib:
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
    if framing.flat:
        return decode_flat(wire, layout, max_elements=max_elements)
    if not isinstance(wire, dict) or not wire:
        raise SchemaError("bad_field", "delta must be a non-empty map of tensors")
    names = list(wire)
    # The names are the layout's (the usual case), which are checked once: no need to
    # check each again. Otherwise as ever: the names first, then the layout.
    same = layout is not None and names == list(layout)
    if not (same and _layout_names_ok(tuple(names))):
        _check_names(wire, "delta")
    if layout is not None and not same:
        raise SchemaError(
            "layout_mismatch", f"delta has tensors {names}, the model has {list(layout)}"
        )
    if layout is not None:  # the usual cases (dense float32, or 100x): all tensors at once
        # Each takes a delta only if every tensor is of its form (else None), so the first
        # tensor says which one can.
        first = next(iter(wire.values()))
        if isinstance(first, dict) and first.get("enc") == "sparse":
            whole: Mapping[str, Encoded] | None = decode_flat_sparse(wire, layout, max_elements)
        else:
            whole = decode_flat_dense(wire, layout, max_elements)
        if whole is not None:
            return whole
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


# --------------------------------------------------------------------------- encoders
# ``to_wire(value) -> wire value`` for the fields not written as they are.


def _params_to_wire(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: encode_tensor(array) for name, array in params.items()}


def _delta_to_wire(delta: Mapping[str, Encoded], message: NodeUpdate) -> Any:
    return delta_to_wire(delta, message.compression)


def _compressed_delta(obj: Mapping[str, Any], key: str) -> Any:
    """A global_delta's ``delta``, as it travels: bin with +zlib, else a map; what is
    inside is checked against the base when applied (``apply_global_delta``)."""
    wire = obj.get(key)
    spec = obj.get("compression")
    if not isinstance(spec, str):
        raise SchemaError("bad_field", "delta needs compression")
    if Framing.named_by(spec).zlib:
        if not isinstance(wire, bytes):
            raise SchemaError("bad_field", "delta must be zlib bytes with compression +zlib")
    elif not isinstance(wire, dict) or not wire:
        raise SchemaError("bad_field", "delta must be a non-empty map")
    return wire


# --------------------------------------------------------------------------- declarations

Check = Callable[[Mapping[str, Any], str], Any]
ToWire = Callable[..., Any]


@dataclass(frozen=True)
class Field:
    """One key of a message, declared once: how it is decoded and how it is written."""

    key: str  # the wire key, which is also the dataclass field's name
    check: Check | None  # (obj, key) -> value; None: given by the decode call (caller's limits)
    nullable: bool = False  # nil or missing decodes to None, without calling check
    to_wire: ToWire | None = None  # value -> wire value; None: written as it is
    with_message: bool = False  # to_wire(value, message) instead
    omit_none: bool = False  # None is left out of the wire instead of written as nil
    # The dataclass default is left out of the wire: a field added later keeps the
    # messages that do not use it byte for byte what they were.
    omit_default: bool = False


class Kind:
    """A message kind: its fields in wire (and PROTOCOL.md table) order, and the order the
    decoder checks them in: ``first`` ones before the rest, a rejected message gets the
    reason of the first failing check."""

    def __init__(
        self,
        type_: str | None,
        cls: type,
        fields: tuple[Field, ...],
        *,
        first: tuple[str, ...] = (),
    ) -> None:
        self.type, self.cls, self.fields = type_, cls, fields
        self.keys = tuple(f.key for f in fields)
        declared = {f.name for f in dataclass_fields(cls)} - {"extra"}
        if sorted(self.keys) != sorted(declared) or not set(first) <= declared:
            raise TypeError(f"{cls.__name__}: fields {self.keys} do not match {declared}")
        self.known = frozenset(self.keys) | {"v", "type"}
        self._values = attrgetter(*self.keys)
        converted = [(f.key, f.to_wire, f.with_message) for f in fields if not f.omit_none]
        self._converted = tuple((k, to_wire) for k, to_wire, w in converted if to_wire and not w)
        self._converted_with = tuple((k, to_wire) for k, to_wire, w in converted if to_wire and w)
        self._omitted = tuple((f.key, f.to_wire) for f in fields if f.omit_none)
        defaults = {f.name: f.default for f in dataclass_fields(cls)}
        self._defaults = tuple((f.key, defaults[f.key]) for f in fields if f.omit_default)
        by_key = {f.key: f for f in fields}
        order = [by_key[k] for k in first] + [f for f in fields if f.key not in first]
        self._checks = tuple((f.key, f.check, f.nullable) for f in order)
        # ``make`` may fill the instance's fields directly: every field is one ``decode``
        # gives, and ``__init__`` would only set them (no ``__post_init__``, no slots).
        self._direct = (
            sorted(declared) == sorted(f.name for f in dataclass_fields(cls))
            and not hasattr(cls, "__post_init__")
            and not hasattr(cls, "__slots__")
        )

    @property
    def check_order(self) -> tuple[str, ...]:
        return tuple(key for key, _, _ in self._checks)

    def to_wire(self, message: Any) -> dict[str, Any]:
        wire: dict[str, Any] = {} if self.type is None else {"v": SCHEMA_VERSION, "type": self.type}
        wire.update(zip(self.keys, self._values(message), strict=True))
        for key, to_wire in self._converted:  # a key keeps its place when its value changes
            wire[key] = to_wire(wire[key])
        for key, with_message in self._converted_with:
            wire[key] = with_message(wire[key], message)
        for key, convert in self._omitted:
            if wire[key] is None:
                del wire[key]
            elif convert is not None:
                wire[key] = convert(wire[key])
        for key, default in self._defaults:
            if wire[key] == default:
                del wire[key]
        return wire

    def make(self, values: dict[str, Any]) -> Any:
        """``cls(**values)`` for the values ``decode`` gave: the same instance, without a
        frozen dataclass's ``__init__`` where it would only set the fields (one
        ``object.__setattr__`` each: ~24,000 instructions an update of 14 fields)."""
        if not self._direct:
            return self.cls(**values)
        message: Any = object.__new__(self.cls)
        message.__dict__.update(values)
        return message

    def decode(
        self, obj: Mapping[str, Any], given: Mapping[str, Callable[..., Any]] | None = None
    ) -> dict[str, Any]:
        """The fields' values by key, checked in order; ``given[key](obj, key, values)``
        decodes a field declared without a check."""
        values: dict[str, Any] = {}
        for key, check, nullable in self._checks:
            if nullable and obj.get(key) is None:
                values[key] = None
            elif check is None:
                values[key] = given[key](obj, key, values)  # type: ignore[index]
            else:
                values[key] = check(obj, key)
        return values


DP_SGD = Kind(None, DpSgd, (
    Field("noise", _positive_float, to_wire=float),
    Field("clip", _positive_float, to_wire=float),
))  # fmt: skip

PLAN = Kind(None, TrainingPlan, (
    Field("learning_rate", _positive_float, to_wire=float),
    Field("batch_size", _at_least_1),
    Field("local_epochs", _at_least_1),
    Field("seed", _positive),
    Field("compression", partial(_spec, default="dense")),
    Field("eval_fraction", _eval_fraction, to_wire=float, omit_default=True),
    Field("proximal_mu", _proximal_mu, to_wire=float, omit_default=True),
    Field("mode", _mode, omit_default=True),
    Field("dp_sgd", _dp_sgd, nullable=True, to_wire=DP_SGD.to_wire, omit_none=True),
))  # fmt: skip


def _plan(obj: Mapping[str, Any], key: str) -> TrainingPlan:
    return TrainingPlan(**PLAN.decode(_get(obj, key, dict)))


GLOBAL = Kind("global", GlobalModel, (
    Field("federation", _name),
    Field("round", _at_least_1),
    Field("model", _str),
    Field("model_id", _model_id),
    Field("final", _bool),
    Field("created_at", _float, to_wire=float),
    Field("plan", _plan, to_wire=PLAN.to_wire),
    Field("params", None, to_wire=_params_to_wire),  # decoded with the caller's max_elements
    # Only when sampling: without the key a message is byte for byte what it was.
    Field("selected", _node_ids, nullable=True, to_wire=list, omit_none=True),
    # From issue 13 on (absent from older aggregators' messages): the task's layout.
    Field("task_version", _task_version, nullable=True, omit_none=True),
    Field("task_fingerprint", _model_id, nullable=True, omit_none=True),
))  # fmt: skip

GLOBAL_DELTA = Kind("global_delta", GlobalDelta, (
    Field("federation", _name),
    Field("round", _at_least_1),
    Field("model", _str),
    Field("model_id", _model_id),
    Field("base_model_id", _model_id),
    Field("final", _bool),
    Field("created_at", _float, to_wire=float),
    Field("plan", _plan, to_wire=PLAN.to_wire),
    Field("xor", _bin),
    Field("selected", _node_ids, nullable=True, to_wire=list, omit_none=True),
    Field("task_version", _task_version, nullable=True, omit_none=True),
    Field("task_fingerprint", _model_id, nullable=True, omit_none=True),
    # Only with --downlink-compression (then xor is empty): absent, the bytes as before.
    Field("compression", _spec, nullable=True, omit_none=True),
    Field("delta", _compressed_delta, nullable=True, omit_none=True),
    # Only in round 1 with --downlink-compression: the seed of the initial parameters.
    Field("init_seed", _positive, nullable=True, omit_none=True),
))  # fmt: skip

UPDATE = Kind("update", NodeUpdate, (
    Field("federation", _name),
    Field("node_id", _name),
    Field("round", _at_least_1),
    Field("base_model_id", _model_id),
    Field("num_examples", _examples),
    Field("train_loss", _saturated, to_wire=float),
    Field("train_seconds", _non_negative_float, to_wire=float),
    Field("sent_at", _float, to_wire=float),
    Field("compression", _spec),
    # Only with federated evaluation; the decoder checks they come together.
    Field("metrics", _metric_values, nullable=True, to_wire=_float_map, omit_none=True),
    Field("eval_examples", _examples, nullable=True, omit_none=True),
    # Only under DP-SGD (plan.dp_sgd); the decoder checks they come together.
    Field("dp_epsilon", _epsilon, nullable=True, to_wire=float, omit_none=True),
    Field("dp_delta", _positive_float, nullable=True, to_wire=float, omit_none=True),
    # Decoded with compression and the caller's limits, encoded as compression says.
    Field("delta", None, to_wire=_delta_to_wire, with_message=True),
), first=("compression", "train_seconds"))  # fmt: skip

STATUS = Kind("status", NodeStatus, (
    Field("federation", _name),
    Field("node_id", _name),
    Field("state", _choice(NODE_STATES)),
    Field("round", _positive, nullable=True),
    Field("model_id", _model_id, nullable=True),
    Field("num_examples", _positive, nullable=True),
    Field("at", _float, nullable=True),
    Field("detail", _str, nullable=True),
    Field("dp_epsilon", _epsilon, nullable=True, to_wire=float, omit_none=True),
    Field("dp_delta", _positive_float, nullable=True, to_wire=float, omit_none=True),
    # From issue 16 on: written only when counted, so older statuses keep their bytes.
    Field("received_bytes", _positive, nullable=True, omit_none=True),
))  # fmt: skip

SERVER = Kind("server", ServerStatus, (
    Field("federation", _name),
    Field("state", _choice(SERVER_STATES)),
    Field("round", _positive),
    Field("expected_nodes", _positive),
    Field("min_nodes", _positive),
    Field("reported", _positive),
    Field("deadline_seconds", _float, nullable=True),
    Field("at", _float, nullable=True),
    # From issue 16 on, in ``done``: the final model's delivery as the nodes counted it.
    Field("final_downlink_delivered", _positive, nullable=True, omit_none=True),
    Field("final_downlink_nodes", _positive, nullable=True, omit_none=True),
))  # fmt: skip

EVALUATION = Kind(None, RoundEvaluation, (
    Field("central", _metric_values, nullable=True, to_wire=_float_map),
    Field("federated", _metric_values, nullable=True, to_wire=_float_map),
))  # fmt: skip


def _evaluation(obj: Mapping[str, Any], key: str) -> RoundEvaluation:
    return RoundEvaluation(**EVALUATION.decode(_get(obj, key, dict)))


# Any key not declared here is kept in RoundMetrics.extra, written after the fields.
METRICS = Kind("metrics", RoundMetrics, (
    Field("federation", _name),
    Field("round", _at_least_1),
    Field("model_id", _model_id),
    Field("participants", _id_list, to_wire=list),
    Field("num_examples", _positive),
    Field("accuracy", _float, nullable=True),
    Field("loss", _float, nullable=True),
    Field("train_loss", _float, nullable=True),
    Field("uplink_bytes", _positive),
    Field("downlink_bytes", _positive),
    Field("global_bytes", _positive),
    Field("rejected", _counts, to_wire=dict),
    Field("seconds", _float, to_wire=float),
    Field("aggregate_seconds", _float, to_wire=float),
    Field("closed_by", _choice(CLOSED_BY)),
    Field("at", _float, to_wire=float),
    Field("train_seconds_median", _float, nullable=True),
    Field("global_delta_bytes", _positive, nullable=True),
    Field("broker_dropped", _positive, nullable=True),
    # The reference aggregator always writes it; without it, the bytes of older messages.
    Field("metrics", _evaluation, nullable=True, to_wire=EVALUATION.to_wire, omit_none=True),
    Field("elapsed", _float, nullable=True, to_wire=float, omit_none=True),
    # From issue 16 on: what nodes reported receiving while the round was open.
    Field("downlink_delivered", _positive, nullable=True, omit_none=True),
), first=("participants", "rejected"))  # fmt: skip

KINDS: dict[type, Kind] = {
    kind.cls: kind for kind in (GLOBAL, GLOBAL_DELTA, UPDATE, STATUS, SERVER, METRICS)
}


# --------------------------------------------------------------------------- encoding


def _to_wire(message: Message) -> dict[str, Any]:
    kind = KINDS.get(type(message)) or next(
        (k for cls, k in KINDS.items() if isinstance(message, cls)), None
    )
    if kind is None:
        raise TypeError(f"not a fedmq message: {type(message).__name__}")
    wire = kind.to_wire(message)
    if isinstance(message, RoundMetrics) and message.extra:
        wire.update((k, v) for k, v in message.extra.items() if k not in wire)
    return wire


def encode(message: Message) -> bytes:
    """msgpack bytes of a message (floats as float64, bytes as bin)."""
    return msgpack.packb(_to_wire(message), use_bin_type=True)


# --------------------------------------------------------------------------- decoding


def decode_global(
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> GlobalModel:
    """Decode and check a global model; its model_id must match its parameters."""
    obj = _unpack(payload, "global", max_bytes)

    def params(obj: Mapping[str, Any], key: str, _values: Any) -> Params:
        return _params(obj, key, max_elements=max_elements, layout=None)

    decoded = GlobalModel(**GLOBAL.decode(obj, {"params": params}))
    if model_id_of(decoded.params) != decoded.model_id:
        raise SchemaError("bad_model_id", "model_id does not match the hash of params")
    return decoded


def decode_global_delta(payload: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> GlobalDelta:
    """Decode the compact global; ``apply_global_delta`` rebuilds and checks the model."""
    return GlobalDelta(**GLOBAL_DELTA.decode(_unpack(payload, "global_delta", max_bytes)))


def decode_update(
    payload: bytes,
    *,
    layout: Shapes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> NodeUpdate:
    """Decode and check a node update; with ``layout`` the delta must match it exactly."""
    obj = _unpack(payload, "update", max_bytes)

    def delta(obj: Mapping[str, Any], _key: str, values: Mapping[str, Any]) -> Any:
        framing = Framing.named_by(values["compression"])
        return _delta(obj, framing, max_bytes=max_bytes, max_elements=max_elements, layout=layout)

    update = UPDATE.make(UPDATE.decode(obj, {"delta": delta}))
    if (update.metrics is None) != (update.eval_examples is None):
        raise SchemaError("bad_field", "metrics and eval_examples must come together")
    if update.eval_examples is not None and update.eval_examples > update.num_examples:
        raise SchemaError(
            "bad_field",
            f"eval_examples {update.eval_examples} is more than num_examples "
            f"{update.num_examples} (a node holds out at most half of its examples)",
        )
    if (update.dp_epsilon is None) != (update.dp_delta is None):
        raise SchemaError("bad_field", "dp_epsilon and dp_delta must come together")
    return update


def decode_status(payload: bytes, *, max_bytes: int = 64 * 1024) -> NodeStatus:
    return NodeStatus(**STATUS.decode(_unpack(payload, "status", max_bytes)))


def decode_server_status(payload: bytes, *, max_bytes: int = 64 * 1024) -> ServerStatus:
    status = ServerStatus(**SERVER.decode(_unpack(payload, "server", max_bytes)))
    if status.min_nodes > status.expected_nodes:
        raise SchemaError("bad_field", "min_nodes is more than expected_nodes")
    return status


def decode_metrics(payload: bytes, *, max_bytes: int = 16 * 1024 * 1024) -> RoundMetrics:
    obj = _unpack(payload, "metrics", max_bytes)
    extra = {k: v for k, v in obj.items() if k not in METRICS.known}
    return RoundMetrics(**METRICS.decode(obj), extra=extra)
