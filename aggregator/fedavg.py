"""FedAvg maths: a streaming example-weighted sum and its application to the global model.

Memory is O(model size) whatever the number of nodes: each update is folded into a
float64 running sum as it arrives and then dropped.
"""

from collections.abc import Mapping

import numpy as np

Params = dict[str, np.ndarray]


# Elements per step of the accumulation loop: the float32 scratch (256 KiB) stays in cache.
CHUNK = 65536
# Largest example count whose float32 form is exact (see WeightedSum.add).
MAX_WEIGHT = 2**24


class WeightedSum:
    """Running ``sum_i n_i * delta_i`` and ``sum_i n_i`` over one round.

    Each ``n_i * delta_i`` is rounded once to float32 (deterministic per update), and the
    float32 products are summed in float64, where a handful of them add up exactly or
    nearly so: the result barely depends on arrival order, and two runs of the same
    federation give the same model. Buffers are updated in place, chunk by chunk, so the
    hot path never allocates an array of model size.
    """

    def __init__(self, layout: Mapping[str, tuple[int, ...]]) -> None:
        self.sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in layout.items()}
        self._scratch = np.empty(CHUNK, dtype=np.float32)
        self.total_weight = 0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: int) -> None:
        if not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be in 1..{MAX_WEIGHT}, got {weight}")
        for name, total in self.sums.items():  # check all before touching any
            if delta[name].shape != total.shape:
                raise ValueError(f"{name} has shape {delta[name].shape}, expected {total.shape}")
        factor = np.float32(weight)
        for name, total in self.sums.items():
            source = delta[name].reshape(-1)
            target = total.reshape(-1)
            for start in range(0, source.size, CHUNK):
                part = source[start : start + CHUNK]
                scaled = self._scratch[: part.size]
                np.multiply(part, factor, out=scaled)
                window = target[start : start + CHUNK]
                np.add(window, scaled, out=window)
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
