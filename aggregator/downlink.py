"""The compressed downlink (``--downlink-compression``): how a new model version reaches
the nodes as a compressed difference from the previous one.

Pure, like the nodes' compression (``fedmq.compression``): ``compress_global`` takes the
previous global G, the server's new model (the target) and the error-feedback state, and
gives the delta as it travels, the model every node rebuilds from it and the new state.
The model published is what the nodes rebuild, not the target: G' = G + decoded delta in
float32 (``schemas.add_delta``, the function the nodes call), read back from the very
wire form they receive, so both sides hold the same bits. With ``ef`` the residual
(target + residual - G', what was not sent) is carried into the next version and kept in
the checkpoint.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from fedmq.compression import Pipeline, parse_spec
from fedmq.compression.transforms import ErrorFeedbackState, error_feedback_init
from fedmq.schemas import add_delta
from fedmq.schemas.messages import delta_from_wire, delta_to_wire
from fedmq.schemas.tensors import Params
from fedmq.settings import NO_DOWNLINK_COMPRESSION

# The stream of a version's stochastic rounding: (plan.seed, version, DOWNLINK_STREAM);
# a node's is (seed, CRC-32 of its id, round, 0, 1), so the two never share draws.
DOWNLINK_STREAM = 2


class Compressed(NamedTuple):
    wire: Any  # the delta as it travels (``delta`` of a global_delta)
    params: Params  # the model it makes: base + decoded delta, as every node rebuilds it
    residual: dict[str, np.ndarray] | None  # what was not sent (with ef), else None


def downlink_pipeline(spec: str | None) -> Pipeline | None:
    """The pipeline ``--downlink-compression`` names; None for ``none`` (the xor form)."""
    if spec is None or spec == NO_DOWNLINK_COMPRESSION:
        return None
    return parse_spec(spec)


def initial_residual(pipeline: Pipeline | None, layout: Mapping[str, tuple[int, ...]]) -> Any:
    """The residual a run starts from: zeros with ``ef``, None without."""
    if pipeline is None or not pipeline.error_feedback:
        return None
    return error_feedback_init(layout).residual


def compress_global(
    pipeline: Pipeline,
    base: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    residual: dict[str, np.ndarray] | None,
    *,
    seed: int,
    version: int,
) -> Compressed:
    """``target - base`` (float32) compressed by ``pipeline`` (with error feedback from
    ``residual`` when it has ``ef``), and the model the nodes rebuild from it."""
    delta = {
        name: np.subtract(
            np.asarray(target[name], np.float32), np.asarray(array, np.float32), dtype=np.float32
        )
        for name, array in base.items()
    }
    state = None
    if pipeline.error_feedback:
        layout = {name: array.shape for name, array in base.items()}
        state = ErrorFeedbackState(
            residual if residual is not None else error_feedback_init(layout).residual
        )
    rng = np.random.default_rng([seed, version, DOWNLINK_STREAM])
    sent, new_state = pipeline.compress(delta, rng, state)
    spec = str(pipeline)
    wire = delta_to_wire(sent, spec)
    layout = {name: tuple(array.shape) for name, array in base.items()}
    params = add_delta(base, delta_from_wire(wire, spec, layout))  # the nodes' reading
    return Compressed(wire, params, None if new_state is None else new_state.residual)
