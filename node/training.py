"""Local training as pure functions: one jit-compiled epoch of plain SGD.

Batches are cut from a padded permutation with a mask, so a shard whose size is not a
multiple of the batch size still compiles once (one shape per shard size) and the last,
partial batch is averaged over its real examples only.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmq.models import MLP, Params
from fedmq.tasks.seeds import epoch_order


def make_epoch_fn(model: MLP, batch_size: int) -> Callable[..., tuple[Params, jax.Array]]:
    """``epoch(params, x, y, order, mask, learning_rate) -> (params, mean_loss)``, jitted."""

    def batch_loss(params: Params, xb: jax.Array, yb: jax.Array, mb: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(model.logits(params, xb, jnp))
        nll = -jnp.take_along_axis(log_probs, yb[:, None], axis=1)[:, 0]
        return jnp.sum(nll * mb) / jnp.maximum(jnp.sum(mb), 1.0)

    def sgd_step(
        params: Params, batch: tuple[jax.Array, jax.Array, jax.Array], learning_rate: jax.Array
    ) -> tuple[Params, jax.Array]:
        xb, yb, mb = batch
        loss, grads = jax.value_and_grad(batch_loss)(params, xb, yb, mb)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return params, loss * jnp.sum(mb)

    @jax.jit
    def epoch(
        params: Params,
        x: jax.Array,
        y: jax.Array,
        order: jax.Array,
        mask: jax.Array,
        learning_rate: jax.Array,
    ) -> tuple[Params, jax.Array]:
        batches = (
            x[order].reshape(-1, batch_size, x.shape[1]),
            y[order].reshape(-1, batch_size),
            mask.reshape(-1, batch_size),
        )
        params, weighted = jax.lax.scan(
            partial(sgd_step, learning_rate=learning_rate), params, batches
        )
        return params, jnp.sum(weighted) / jnp.sum(mask)

    return epoch


class LocalTrainer:
    """Holds a node's data on the device and the compiled epoch for its model."""

    def __init__(self, model: MLP, x: np.ndarray, y: np.ndarray) -> None:
        if x.shape[1] != model.sizes[0]:
            raise ValueError(f"data has {x.shape[1]} features, the model expects {model.sizes[0]}")
        if int(y.min()) < 0 or int(y.max()) >= model.sizes[-1]:
            raise ValueError(
                f"labels must be class ids 0..{model.sizes[-1] - 1}, found {int(y.min())}"
                f"..{int(y.max())}"
            )
        self.model = model
        self.num_examples = len(y)
        self._x = jnp.asarray(x, dtype=jnp.float32)
        self._y = jnp.asarray(y, dtype=jnp.int32)
        self._epochs: dict[int, Callable[..., tuple[Params, jax.Array]]] = {}

    def train(
        self,
        params: dict[str, np.ndarray],
        *,
        learning_rate: float,
        batch_size: int,
        local_epochs: int,
        seed: int,
        node_id: str,
        round: int,
    ) -> tuple[dict[str, np.ndarray], float]:
        """New parameters (numpy float32) and the mean training loss of the last epoch."""
        if batch_size not in self._epochs:
            self._epochs[batch_size] = make_epoch_fn(self.model, batch_size)
        epoch_fn = self._epochs[batch_size]
        # numpy in, numpy out: the jitted call moves them itself, cheaper than jnp.asarray
        current: Params = dict(params)
        lr = np.float32(learning_rate)
        loss: Any = np.float32(np.nan)
        for epoch in range(local_epochs):
            order, mask = epoch_order(
                self.num_examples,
                batch_size,
                seed=seed,
                node_id=node_id,
                round_number=round,
                epoch=epoch,
            )
            current, loss = epoch_fn(current, self._x, self._y, order, mask, lr)
        return {name: np.asarray(array) for name, array in current.items()}, float(loss)


def delta(new: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a node sends: trained minus the global it started from, in float32."""
    return {name: (new[name] - base[name]).astype(np.float32) for name in base}
