"""A fedmq task written with Flax (linen): a small CNN on the 8x8 digits.

Run it from this folder (fedmq imports ``flax_task`` from the working directory), with
node files as ``fedmq demo --data-dir`` reads them:

    pip install 'fedmq[demo,flax]'
    python -c "from pathlib import Path; from fedmq.datasets import digits, write_node_files; \\
        write_node_files(*digits(), 5, 'iid', 0, Path('digits-data'))"
    fedmq demo --task flax_task:task --data-dir digits-data --rounds 20

The params are the nested dict Flax gives (``model.init(key, x)["params"]``); each leaf
travels under its key path: ``Conv_0.kernel``, ``Conv_0.bias``, ..., ``Dense_0.kernel``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedmq import Task


class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(-1, 8, 8, 1)  # the node files hold rows of 64 pixels
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape(len(x), -1))


model = DigitsCNN()


def init(key: jax.Array) -> dict:
    return model.init(key, jnp.zeros((1, 64), jnp.float32))["params"]


def losses(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Cross-entropy of each example (fedmq averages them over the batch)."""
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(jnp.int32))


def metrics(params: dict, batch: tuple[jax.Array, jax.Array]) -> dict:
    x, y = batch
    logits = model.apply({"params": params}, x)
    return {"loss": jnp.mean(losses(params, batch)), "accuracy": jnp.mean(logits.argmax(-1) == y)}


task = Task(
    name="flax-digits-cnn", init=init, loss=losses, optimizer=optax.adam(3e-3), metrics=metrics
)
