"""fedmq's public API on the wire: topic layout and msgpack messages, schema version 1.

docs/PROTOCOL.md is the human contract; this package is its executable form.
"""

from fedmq.schemas.errors import SchemaError
from fedmq.schemas.messages import (
    SCHEMA_VERSION,
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
    apply_global_delta,
    decode_global,
    decode_global_delta,
    decode_metrics,
    decode_server_status,
    decode_status,
    decode_update,
    encode,
    initial_global,
    make_compressed_global_delta,
    make_global_delta,
    make_init_global_delta,
    model_id_of,
)
from fedmq.schemas.topics import Topics, validate_name

__all__ = [
    "SCHEMA_VERSION",
    "DpSgd",
    "GlobalDelta",
    "GlobalModel",
    "NodeStatus",
    "NodeUpdate",
    "RoundEvaluation",
    "RoundMetrics",
    "SchemaError",
    "ServerStatus",
    "Topics",
    "TrainingPlan",
    "add_delta",
    "apply_global_delta",
    "decode_global",
    "decode_global_delta",
    "decode_metrics",
    "decode_server_status",
    "decode_status",
    "decode_update",
    "encode",
    "initial_global",
    "make_compressed_global_delta",
    "make_global_delta",
    "make_init_global_delta",
    "model_id_of",
    "validate_name",
]
