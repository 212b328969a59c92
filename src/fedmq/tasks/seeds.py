"""The PRNG key fedmq hands to ``Task.init`` for a federation seed, and back.

``seed_key(seed)`` equals ``jax.random.key(seed)`` for seeds below 2**32 (the threefry
key ``[0, seed]``); for larger seeds it keeps all 64 bits (``[seed >> 32, seed & mask]``),
as ``jax.random.key`` would with 64-bit integers enabled, where it otherwise drops the high
word. ``seed_of_key`` inverts it, so the built-in tasks draw their initial parameters from
``numpy.random.default_rng(seed)`` exactly as fedmq always has.
"""

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_SEED = 2**64 - 1  # what a msgpack int (plan.seed) can hold
_WORD = 0xFFFFFFFF


def seed_key(seed: int) -> jax.Array:
    """A threefry2x32 PRNG key that holds all of ``seed`` (0 <= seed < 2**64)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} must be between 0 and 2**64 - 1")
    words = np.array([(seed >> 32) & _WORD, seed & _WORD], dtype=np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(words), impl="threefry2x32")


def seed_of_key(key: Any) -> int:
    """The seed of a threefry key (typed, or the raw uint32 pair of ``jax.random.PRNGKey``).

    Any other key (another PRNG implementation) gives an int drawn from all its words, so
    it still determines the result.
    """
    words = np.asarray(_key_data(key)).astype(np.uint64).ravel()
    if words.shape == (2,):
        return int(words[0]) << 32 | int(words[1])
    return int(np.random.default_rng(words.tolist()).integers(0, 2**63))


def _key_data(key: Any) -> Any:
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def epoch_order(
    num_examples: int, batch_size: int, *, seed: int, node_id: str, round_number: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled example indices padded to whole batches, and the mask of real ones.

    Seeded by (federation seed, node id, round, epoch) so every run replays exactly.
    """
    rng = np.random.default_rng([seed, zlib.crc32(node_id.encode()), round_number, epoch])
    order = rng.permutation(num_examples).astype(np.int32)
    padded = -(-num_examples // batch_size) * batch_size
    mask = np.zeros(padded, dtype=np.float32)
    mask[:num_examples] = 1.0
    return np.pad(order, (0, padded - num_examples)), mask
