"""FedAvg maths: a streaming example-weighted sum and its application to the global model.

Memory is O(model size) whatever the number of nodes: each update is folded into a
float64 running sum as it arrives and then dropped. Products of float32 deltas and integer
weights are exact in float64, so the sum barely depends on arrival order.
"""

from collections.abc import Mapping

import numpy as np

Params = dict[str, np.ndarray]


class WeightedSum:
    """Running ``sum_i n_i * delta_i`` and ``sum_i n_i`` over one round.

    Mutates its own float64 buffers in place: allocating fresh arrays per update would
    double the memory traffic of the hot path for no gain in clarity.
    """

    def __init__(self, layout: Mapping[str, tuple[int, ...]]) -> None:
        self.sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in layout.items()}
        self._scratch = {name: np.empty(shape, dtype=np.float64) for name, shape in layout.items()}
        self.total_weight = 0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: int) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, total in self.sums.items():
            scratch = self._scratch[name]
            np.multiply(delta[name], float(weight), out=scratch, dtype=np.float64)
            np.add(total, scratch, out=total)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> Params:
        """The example-weighted mean delta (float64); requires at least one update."""
        if self.count == 0:
            raise ValueError("no update was added")
        return {name: total / self.total_weight for name, total in self.sums.items()}


def apply_mean_delta(
    global_params: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]
) -> Params:
    """FedAvg with server learning rate 1: the next global model, in the globals' dtype."""
    return {
        name: (array.astype(np.float64) + mean_delta[name]).astype(array.dtype)
        for name, array in global_params.items()
    }


def fedavg(global_params: Mapping[str, np.ndarray], updates: list[tuple[Params, int]]) -> Params:
    """Batch form of the streaming path, for tests and offline use."""
    running = WeightedSum({name: array.shape for name, array in global_params.items()})
    for delta, weight in updates:
        running.add(delta, weight)
    return apply_mean_delta(global_params, running.mean())
