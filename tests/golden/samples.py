"""The golden sample messages: one fixed instance of every wire message kind.

Shared by ``make_golden.py`` (which writes ``<name>.msgpack`` next to this file) and
``tests/unit/test_golden.py`` (which checks that ``encode`` still produces exactly those
bytes), so a change to the wire format shows up as a failing test and a diff of the
committed files -- never silently.

Everything here is deterministic: parameters are float32 multiples of 1/8 (exact in
binary), timestamps and sizes are constants.
"""

import dataclasses
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedmq.schemas import (
    DpSgd,
    GlobalDelta,
    GlobalModel,
    NodeStatus,
    NodeUpdate,
    RoundEvaluation,
    RoundMetrics,
    ServerStatus,
    TrainingPlan,
    add_delta,
    decode_global,
    decode_global_delta,
    decode_metrics,
    decode_server_status,
    decode_status,
    decode_update,
    make_init_global_delta,
    model_id_of,
)
from fedmq.schemas.encodings import Quantized, Sparse
from fedmq.schemas.messages import delta_to_wire
from fedmq.tasks.layout import layout_of

GOLDEN_DIR = Path(__file__).resolve().parent
FEDERATION = "golden"
NODE = "node-01"
LAYOUT = {"l0.w": (4, 3), "l0.b": (3,), "l1.w": (3, 2), "l1.b": (2,)}


def ramp(shape: tuple[int, ...], *, start: int, step: float = 0.125) -> np.ndarray:
    """float32 values ``(start + i) * step`` in C order: exact, small, deterministic."""
    count = int(np.prod(shape, dtype=np.int64))
    return ((np.arange(count, dtype=np.float32) + start) * np.float32(step)).reshape(shape)


PARAMS = {name: ramp(shape, start=-3 * i) for i, (name, shape) in enumerate(LAYOUT.items())}
DELTA = {
    name: ramp(shape, start=i - 2, step=-0.0625) for i, (name, shape) in enumerate(LAYOUT.items())
}
MODEL_ID = model_id_of(PARAMS)

GLOBAL = GlobalModel(
    federation=FEDERATION,
    round=3,
    model="tiny-mlp",
    model_id=MODEL_ID,
    params=PARAMS,
    plan=TrainingPlan(learning_rate=0.05, batch_size=32, local_epochs=2, seed=7),
    final=False,
    created_at=1_700_000_000.25,
)

UPDATE = NodeUpdate(
    federation=FEDERATION,
    node_id=NODE,
    round=3,
    base_model_id=MODEL_ID,
    num_examples=120,
    train_loss=0.6875,
    train_seconds=1.75,
    delta=DELTA,
    compression="dense",
    sent_at=1_700_000_001.5,
)


# A compressed update as topk:0.1+int8 produces it: ceil(0.1 n) of each tensor's n
# elements (2 of l0.w's 12, 1 of each other's), 8-bit codes, one scale per chunk. Built
# by hand (no random rounding) so the bytes are fixed.
def int8_sparse(shape: tuple[int, ...]) -> Sparse:
    size = int(np.prod(shape))
    kept = max(1, -(-size // 10))
    positions, codes = ([0, size - 1], [-127, 64]) if kept == 2 else ([size - 1], [-127])
    return Sparse(
        shape=shape,
        indices=np.array(positions, dtype=np.int64),
        values=Quantized(shape=(kept,), bits=8, chunk=256, scales=np.array([0.0625], np.float32),
                         codes=np.array(codes, dtype=np.int8)),
    )  # fmt: skip


SPARSE_INT8_DELTA = {name: int8_sparse(shape) for name, shape in LAYOUT.items()}

UPDATE_SPARSE_INT8 = dataclasses.replace(
    UPDATE, delta=SPARSE_INT8_DELTA, compression="topk:0.1+int8+ef"
)


# The same with one-bit values (topk+sign), as many as topk:0.1 keeps: ceil(0.1 n) of
# each tensor's n elements, so 2 of l0.w's 12 and 1 of each other tensor's. Codes +1 and
# -1 are the bits 1 and 0, lowest bit first; one scale, the mean magnitude.
# docs/PROTOCOL.md 12.7 shows l0.w's map, 12.9 the whole delta in the flat form.
SIGN_KEPT = {
    "l0.w": ([0, 11], [1, -1]),
    "l0.b": ([1], [1]),
    "l1.w": ([5], [-1]),
    "l1.b": ([0], [1]),
}


def sign_sparse(name: str, shape: tuple[int, ...]) -> Sparse:
    positions, codes = SIGN_KEPT[name]
    return Sparse(
        shape=shape,
        indices=np.array(positions, dtype=np.int64),
        values=Quantized(shape=(len(positions),), bits=1, chunk=256,
                         scales=np.array([0.1875], np.float32),
                         codes=np.array(codes, dtype=np.int8)),
    )  # fmt: skip


SPARSE_SIGN_DELTA = {name: sign_sparse(name, shape) for name, shape in LAYOUT.items()}

UPDATE_SPARSE_SIGN = dataclasses.replace(
    UPDATE, delta=SPARSE_SIGN_DELTA, compression="topk:0.1+sign+ef"
)

# The same numbers in the flat form (topk+sign+flat): one run over the 23 parameters laid
# end to end, positions Elias-Fano coded; docs/PROTOCOL.md 12.9 walks through its bytes.
UPDATE_FLAT_SIGN = dataclasses.replace(
    UPDATE, delta=SPARSE_SIGN_DELTA, compression="topk:0.1+sign+ef+flat"
)


def decode_update_of_layout(payload: bytes) -> NodeUpdate:
    """A flat delta names no tensors: the aggregator reads it against its model's layout;
    as a dict of the per-tensor sparse forms it compares with the sample."""
    update = decode_update(payload, layout=LAYOUT)
    return dataclasses.replace(update, delta=dict(update.delta.items()))


# The compact downlink. zlib at level 0 (stored blocks) keeps the bytes the same for every
# zlib implementation; the aggregator compresses for real, which decodes the same way.
GLOBAL_DELTA = GlobalDelta(
    federation=FEDERATION,
    round=4,
    model="tiny-mlp",
    model_id=MODEL_ID,
    base_model_id="0123456789abcdef0123456789abcdef",
    plan=GLOBAL.plan,
    xor=zlib.compress(bytes(range(32)), 0),
    final=False,
    created_at=1_700_000_020.5,
)

# The same two forms as an aggregator of issue 13 sends them: with the task's declared
# version and the fingerprint of its layout (fedmq.tasks.layout: task "tiny-mlp", version
# "2", the four tensors of LAYOUT in float32). Old decoders ignore the two keys.
TASK_VERSION = "2"
TASK_FINGERPRINT = layout_of("tiny-mlp", TASK_VERSION, PARAMS).fingerprint
GLOBAL_TASK = dataclasses.replace(
    GLOBAL, task_version=TASK_VERSION, task_fingerprint=TASK_FINGERPRINT
)
GLOBAL_DELTA_TASK = dataclasses.replace(
    GLOBAL_DELTA, task_version=TASK_VERSION, task_fingerprint=TASK_FINGERPRINT
)

# The compressed form (--downlink-compression topk:0.1+sign+ef+flat): the sign delta of
# UPDATE_FLAT_SIGN as it travels, from the base PARAMS to the model add_delta makes of
# it; xor is empty, so an older node fails to rebuild it and fetches the full model.
COMPRESSED_SPEC = "topk:0.1+sign+ef+flat"
COMPRESSED_PARAMS = add_delta(PARAMS, SPARSE_SIGN_DELTA)
GLOBAL_DELTA_COMPRESSED = dataclasses.replace(
    GLOBAL_DELTA_TASK,
    model_id=model_id_of(COMPRESSED_PARAMS),
    base_model_id=MODEL_ID,
    xor=b"",
    compression=COMPRESSED_SPEC,
    delta=delta_to_wire(SPARSE_SIGN_DELTA, COMPRESSED_SPEC),
)

# Round 1 with --downlink-compression: the seed of the task's initial parameters, no
# difference (base_model_id is model_id, xor empty); nodes build the model themselves.
GLOBAL_DELTA_INIT = make_init_global_delta(dataclasses.replace(GLOBAL_TASK, round=1), 7)


STATUS = NodeStatus(
    federation=FEDERATION,
    node_id=NODE,
    state="training",
    round=3,
    model_id=MODEL_ID,
    num_examples=120,
    at=1_700_000_000.5,
    detail="round 3 started",
)

# Only the required fields: pins how absent optionals travel (as msgpack nil).
# A node of issue 16 on: with its count of bytes received on the global topics.
STATUS_RECEIVED = dataclasses.replace(STATUS, received_bytes=123_456)
STATUS_MINIMAL = NodeStatus(federation=FEDERATION, node_id="node-02", state="online")

SERVER = ServerStatus(
    federation=FEDERATION,
    state="waiting",
    round=3,
    expected_nodes=4,
    min_nodes=2,
    reported=1,
    deadline_seconds=30.0,
    at=1_700_000_000.75,
)

# The final model's delivery, counted after the final global (issue 16, PROTOCOL 8.4).
SERVER_DONE_FINAL = dataclasses.replace(
    SERVER,
    state="done",
    round=31,
    reported=0,
    at=1_700_000_100.5,
    final_downlink_delivered=29_040,
    final_downlink_nodes=4,
)

METRICS = RoundMetrics(
    federation=FEDERATION,
    round=3,
    model_id=MODEL_ID,
    participants=[NODE, "node-02"],
    num_examples=240,
    accuracy=0.875,
    loss=0.375,
    train_loss=0.6875,
    uplink_bytes=1_536,
    downlink_bytes=3_072,
    global_bytes=768,
    rejected={"wrong_round": 1},
    seconds=12.5,
    aggregate_seconds=0.25,
    closed_by="all_reported",
    at=1_700_000_013.0,
)


# Federated evaluation (docs/PROTOCOL.md 8.1, 8.2, 8.5): the plan's eval_fraction, an
# update's metrics of the model it received, and a round's central and federated metrics.
# Written out whole, not derived from the samples above, so a change to those leaves
# these bytes alone.
GLOBAL_EVAL = GlobalModel(
    federation=FEDERATION,
    round=3,
    model="tiny-mlp",
    model_id=MODEL_ID,
    params=PARAMS,
    plan=TrainingPlan(learning_rate=0.05, batch_size=32, local_epochs=2, seed=7,
                      eval_fraction=0.25),
    final=False,
    created_at=1_700_000_000.25,
)  # fmt: skip

UPDATE_METRICS = NodeUpdate(
    federation=FEDERATION,
    node_id=NODE,
    round=3,
    base_model_id=MODEL_ID,
    num_examples=90,
    train_loss=0.6875,
    train_seconds=1.75,
    delta=DELTA,
    compression="dense",
    sent_at=1_700_000_001.5,
    metrics={"accuracy": 0.75, "loss": 0.5625},
    eval_examples=30,
)

METRICS_EVALUATED = RoundMetrics(
    federation=FEDERATION,
    round=3,
    model_id=MODEL_ID,
    participants=[NODE, "node-02"],
    num_examples=180,
    accuracy=0.875,
    loss=0.375,
    train_loss=0.6875,
    uplink_bytes=1_536,
    downlink_bytes=3_072,
    global_bytes=768,
    rejected={},
    seconds=12.5,
    aggregate_seconds=0.25,
    closed_by="all_reported",
    at=1_700_000_013.0,
    metrics=RoundEvaluation(
        central={"accuracy": 0.875, "loss": 0.375},
        federated={"accuracy": 0.8125, "loss": 0.5},
    ),
)


# FedProx (docs/PROTOCOL.md 8.1): the plan's proximal_mu, written out whole as above.
GLOBAL_PROXIMAL = GlobalModel(
    federation=FEDERATION,
    round=3,
    model="tiny-mlp",
    model_id=MODEL_ID,
    params=PARAMS,
    plan=TrainingPlan(learning_rate=0.05, batch_size=32, local_epochs=2, seed=7,
                      proximal_mu=0.125),
    final=False,
    created_at=1_700_000_000.25,
)  # fmt: skip


# Asynchronous mode (issue 14): the plan says so, and a version's metrics say how it
# was made (buffer_full), when (elapsed) and how stale its updates were (extra keys).
GLOBAL_ASYNC = GlobalModel(
    federation=FEDERATION,
    round=5,
    model="tiny-mlp",
    model_id=MODEL_ID,
    params=PARAMS,
    plan=TrainingPlan(learning_rate=0.05, batch_size=32, local_epochs=1, seed=7, mode="async"),
    final=False,
    created_at=1_700_000_000.25,
)

METRICS_ASYNC = RoundMetrics(
    federation=FEDERATION,
    round=5,
    model_id=MODEL_ID,
    participants=[NODE, "node-02"],
    num_examples=240,
    accuracy=0.875,
    loss=0.375,
    train_loss=0.6875,
    uplink_bytes=1_536,
    downlink_bytes=3_072,
    global_bytes=768,
    rejected={"stale": 1},
    seconds=0.125,
    aggregate_seconds=0.0625,
    closed_by="buffer_full",
    at=1_700_000_012.5,
    train_seconds_median=0.5,
    global_delta_bytes=512,
    broker_dropped=0,
    metrics=RoundEvaluation(central={"accuracy": 0.875, "loss": 0.375}, federated=None),
    elapsed=12.5,
    extra={"staleness_max": 3, "staleness_mean": 1.5},
)

# A site aggregator's metrics of one root round, on its site broker (docs/hierarchy.md):
# model_id is the root's model the round trained on; the site sends no model.
METRICS_SITE = RoundMetrics(
    federation=FEDERATION,
    round=4,
    model_id=MODEL_ID,
    participants=[NODE, "node-02"],
    num_examples=240,
    accuracy=None,
    loss=None,
    train_loss=0.6875,
    uplink_bytes=1_536,
    downlink_bytes=0,
    global_bytes=0,
    rejected={},
    seconds=0.125,
    aggregate_seconds=0.0625,
    closed_by="all_reported",
    at=1_700_000_012.5,
    train_seconds_median=0.5,
    metrics=RoundEvaluation(central=None, federated=None),
    elapsed=12.5,
    extra={"site": "site-north", "upstream_bytes": 800, "upstream_compression": "dense"},
)


# DP-SGD (issue 17, docs/PROTOCOL.md 8.1-8.3): the plan's dp_sgd, the epsilon a node has
# spent in its update and status. Train loss 0: a DP-SGD node does not send its loss.
GLOBAL_DP = GlobalModel(
    federation=FEDERATION,
    round=3,
    model="tiny-mlp",
    model_id=MODEL_ID,
    params=PARAMS,
    plan=TrainingPlan(learning_rate=0.05, batch_size=32, local_epochs=1, seed=7,
                      dp_sgd=DpSgd(noise=1.125, clip=0.5)),
    final=False,
    created_at=1_700_000_000.25,
)  # fmt: skip

UPDATE_DP = dataclasses.replace(UPDATE, train_loss=0.0, dp_epsilon=2.5, dp_delta=0.0009765625)

STATUS_DP = dataclasses.replace(
    STATUS,
    state="idle",
    detail="privacy budget spent: this round would take epsilon from 2.5 to 3.25 (delta "
    "0.000977), past --max-epsilon 3; the node trains no more under DP-SGD",
    dp_epsilon=2.5,
    dp_delta=0.0009765625,
)

METRICS_DP = dataclasses.replace(METRICS_ASYNC, train_loss=None, extra={"dp_epsilon_max": 2.5})

# DP-FedAvg with clip=adaptive: the run's epsilon, its delta, and the clip norm this round
# used (docs/PROTOCOL.md 8.5)
METRICS_DP_FEDAVG = dataclasses.replace(
    METRICS,
    extra={
        "dp_fedavg_epsilon": 3.5,
        "dp_fedavg_delta": 0.0063,
        "dp_fedavg_clipped": 40,
        "dp_fedavg_clip": 0.125,
    },
)


class Sample(NamedTuple):
    message: Any
    decode: Callable[[bytes], Any]


# An aggregator of issue 16 on: with what the nodes reported receiving in the round.
METRICS_DELIVERED = dataclasses.replace(METRICS, downlink_delivered=98_765)


SAMPLES: dict[str, Sample] = {
    "global": Sample(GLOBAL, decode_global),
    "update": Sample(UPDATE, decode_update),
    "update_sparse_int8": Sample(UPDATE_SPARSE_INT8, decode_update),
    "update_sparse_sign": Sample(UPDATE_SPARSE_SIGN, decode_update),
    "update_flat_sign": Sample(UPDATE_FLAT_SIGN, decode_update_of_layout),
    "global_delta": Sample(GLOBAL_DELTA, decode_global_delta),
    "global_task": Sample(GLOBAL_TASK, decode_global),
    "global_delta_task": Sample(GLOBAL_DELTA_TASK, decode_global_delta),
    "global_delta_compressed": Sample(GLOBAL_DELTA_COMPRESSED, decode_global_delta),
    "global_delta_init": Sample(GLOBAL_DELTA_INIT, decode_global_delta),
    "status": Sample(STATUS, decode_status),
    "status_minimal": Sample(STATUS_MINIMAL, decode_status),
    "status_received": Sample(STATUS_RECEIVED, decode_status),
    "server": Sample(SERVER, decode_server_status),
    "server_done_final": Sample(SERVER_DONE_FINAL, decode_server_status),
    "metrics": Sample(METRICS, decode_metrics),
    "global_eval": Sample(GLOBAL_EVAL, decode_global),
    "update_metrics": Sample(UPDATE_METRICS, decode_update),
    "metrics_evaluated": Sample(METRICS_EVALUATED, decode_metrics),
    "global_proximal": Sample(GLOBAL_PROXIMAL, decode_global),
    "global_async": Sample(GLOBAL_ASYNC, decode_global),
    "metrics_async": Sample(METRICS_ASYNC, decode_metrics),
    "metrics_site": Sample(METRICS_SITE, decode_metrics),
    "global_dp": Sample(GLOBAL_DP, decode_global),
    "update_dp": Sample(UPDATE_DP, decode_update),
    "status_dp": Sample(STATUS_DP, decode_status),
    "metrics_dp": Sample(METRICS_DP, decode_metrics),
    "metrics_delivered": Sample(METRICS_DELIVERED, decode_metrics),
    "metrics_dp_fedavg": Sample(METRICS_DP_FEDAVG, decode_metrics),
}


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.msgpack"


def plain(value: Any) -> Any:
    """A comparable form of a message: arrays become (dtype, shape, bytes), every scalar
    keeps its type, and dict order counts (parameter order is part of the model id)."""
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
