"""A node's held-out examples for federated evaluation (``plan.eval_fraction``).

The split is seeded by the federation seed and the node id only, never by the round: it
is the same in every round, so an example held out to evaluate the global model is never
trained on. It draws from its own stream (``HOLDOUT_STREAM``), apart from the epoch
shuffles of ``fedmq.tasks.seeds.epoch_order``.
"""

import math
import zlib

import numpy as np

MAX_EVAL_FRACTION = 0.5  # as schemas.messages: a node trains on at least what it holds out
HOLDOUT_STREAM = 0x686F6C64  # "hold": a seed word epoch_order's 4-word seeds never equal


def held_out_count(num_examples: int, fraction: float) -> int:
    """How many of ``num_examples`` are held out: floor(fraction x n), at least 1 when
    fraction > 0 and n >= 2, none when fraction is 0 or n is 1 (it must train on some)."""
    if not 0.0 <= fraction <= MAX_EVAL_FRACTION:
        raise ValueError(f"eval fraction {fraction} must be in [0, {MAX_EVAL_FRACTION}]")
    if num_examples < 0:
        raise ValueError(f"num_examples {num_examples} must be >= 0")
    if fraction == 0.0 or num_examples < 2:
        return 0
    return max(1, math.floor(fraction * num_examples))


def holdout(
    num_examples: int, fraction: float, *, seed: int, node_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) into a node's ``num_examples`` examples, each sorted
    (int64), disjoint, together all of them. Depends on (seed, node id, n, fraction) only."""
    held = held_out_count(num_examples, fraction)
    everything = np.arange(num_examples, dtype=np.int64)
    if held == 0:
        return everything, np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(node_id.encode()), HOLDOUT_STREAM])
    chosen = np.zeros(num_examples, dtype=bool)
    chosen[rng.permutation(num_examples)[:held]] = True
    return everything[~chosen], everything[chosen]
