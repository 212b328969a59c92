"""FedAvg maths: an example-weighted sum and its application to the global model.

``WeightedSum`` folds updates in one at a time into a float64 running sum of model size.
Under plain FedAvg the aggregator feeds it each update as it is accepted (in arrival
order; ``aggregator.combine.Held`` says why that order does not change the model in
practice); the clipped and capped forms add a round's held updates in node-id order
when it closes.
"""

import math
from collections.abc import Mapping
from typing import cast

import numpy as np

from fedmq.schemas.encodings import Encoded, WholeDelta, encoding_of, shape_of
from fedmq.schemas.tensors import Params

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
        self._layout = tuple((name, tuple(shape)) for name, shape in layout.items())
        # One buffer for the whole model (tensors one after the other, in layout order), so
        # a FlatSparse update is one scatter-add; ``sums`` are views on it.
        self._flat = np.zeros(sum(math.prod(shape) for _, shape in self._layout), np.float64)
        self.sums = {}
        offset = 0
        for name, shape in self._layout:
            size = math.prod(shape)
            self.sums[name] = self._flat[offset : offset + size].reshape(shape)
            offset += size
        self._scratch = np.empty(CHUNK, dtype=np.float32)
        self.total_weight = 0
        self.count = 0

    def add(self, delta: Mapping[str, Encoded], weight: int) -> None:
        """Fold in one update: tensors in any encoding, as decoded (each adds itself:
        ``schemas.encodings.Encoding.add_scaled_into``)."""
        if not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be in 1..{MAX_WEIGHT}, got {weight}")
        factor = np.float32(weight)
        # A WholeDelta (the flat form) adds itself in one run over the flat sum. Found by
        # its method: isinstance on a runtime-checkable protocol costs ~17 us an update.
        whole = cast(WholeDelta, delta) if hasattr(delta, "add_scaled_into") else None
        if whole is not None and whole.layout == self._layout:
            whole.add_scaled_into(self._flat, factor)
            self.total_weight += weight
            self.count += 1
            return
        for name, total in self.sums.items():  # check all before touching any
            if shape_of(delta[name]) != total.shape:
                raise ValueError(
                    f"{name} has shape {shape_of(delta[name])}, expected {total.shape}"
                )
        for name, total in self.sums.items():
            tensor = delta[name]
            encoding_of(tensor).add_scaled_into(tensor, total.reshape(-1), factor, self._scratch)
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
