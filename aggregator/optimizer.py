"""The server update: how a model version's aggregated delta moves the global model.

Shaped as an optax transform: a pair of pure functions, ``init(params) -> state`` and
``update(params, delta, state) -> (new params, new state)``. Today's update is FedAvg's,
server learning rate 1 (``apply_delta``): the mean delta added to the global model; it
keeps no state. A server optimiser (FedAvgM, FedAdam: optax transforms treating the
delta as a pseudo-gradient) is another ``ServerOptimizer`` whose state would then be
kept in the checkpoint, beside the model it applies to.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fedmq.aggregator.fedavg import apply_mean_delta
from fedmq.schemas.tensors import Params

State = Any  # an optimiser's own NamedTuple (or nested tuples of arrays)
Arrays = Mapping[str, np.ndarray]


class ServerOptimizer(NamedTuple):
    init: Callable[[Arrays], State]  # params -> state
    update: Callable[[Arrays, Arrays, State], tuple[Params, State]]  # params, delta, state


class EmptyState(NamedTuple):
    """The state of an update that keeps none."""


def apply_delta() -> ServerOptimizer:
    """FedAvg's server update: params + delta, in the globals' dtype (``apply_mean_delta``)."""

    def init(params: Arrays) -> EmptyState:
        del params
        return EmptyState()

    def update(params: Arrays, delta: Arrays, state: State) -> tuple[Params, State]:
        return apply_mean_delta(params, delta), state

    return ServerOptimizer(init, update)
