"""A fedmq task written with Equinox: a 1-D CNN over 6-axis IMU windows (activity-cnn's data).

Run it from this folder (fedmq imports ``equinox_task`` from the working directory):

    pip install 'fedmq[equinox]'
    python -c "from pathlib import Path; from fedmq.tasks.builtin_data import builtin_data; \\
        from fedmq.datasets import write_node_files; \\
        write_node_files(*builtin_data('activity-cnn'), 10, 'iid', 0, Path('activity-data'))"
    fedmq demo --task equinox_task:task --data-dir activity-data --rounds 30

(the train split is ordered by subject, so ten IID shards are the ten subjects).

An Equinox model is a pytree holding arrays and other things (here the activation
function). The params fedmq sends are the model filtered to its arrays,
``eqx.filter(model, eqx.is_array)``: the same module with ``None`` where the non-arrays
were. ``apply`` puts them back with ``eqx.combine(params, STATIC)``, where ``STATIC`` is the
rest of a model of the same architecture, made once here (it holds no weights). Tensors are
named by attribute path: ``convs.0.weight``, ``convs.0.bias``, ..., ``head.weight``.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from fedmq import Task

CHANNELS, CLASSES = 6, 6


class ActivityCNN(eqx.Module):
    convs: tuple[eqx.nn.Conv1d, eqx.nn.Conv1d]
    head: eqx.nn.Linear
    activation: Callable[[jax.Array], jax.Array]  # not an array: filtered out, combined back

    def __init__(self, key: jax.Array):
        k0, k1, k2 = jax.random.split(key, 3)
        self.convs = (
            eqx.nn.Conv1d(CHANNELS, 16, 5, padding="SAME", key=k0),
            eqx.nn.Conv1d(16, 32, 5, padding="SAME", key=k1),
        )
        self.head = eqx.nn.Linear(32, CLASSES, key=k2)
        self.activation = jax.nn.relu

    def __call__(self, window: jax.Array) -> jax.Array:
        """Class scores of one window, shape (time, channels)."""
        h = self.activation(self.convs[0](window.T))  # Equinox convolves (channels, time)
        h = eqx.nn.MaxPool1d(4, 4)(h)
        h = self.activation(self.convs[1](h)).mean(axis=1)
        return self.head(h)


STATIC = eqx.filter(ActivityCNN(jax.random.key(0)), eqx.is_array, inverse=True)


def init(key: jax.Array) -> ActivityCNN:
    return eqx.filter(ActivityCNN(key), eqx.is_array)


def logits(params: ActivityCNN, x: jax.Array) -> jax.Array:
    model = eqx.combine(params, STATIC)
    return jax.vmap(model)(x)


def losses(params: ActivityCNN, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y.astype(jnp.int32))


def metrics(params: ActivityCNN, batch: tuple[jax.Array, jax.Array]) -> dict:
    x, y = batch
    return {
        "loss": jnp.mean(losses(params, batch)),
        "accuracy": jnp.mean(logits(params, x).argmax(-1) == y),
    }


task = Task(
    name="equinox-activity-cnn", init=init, loss=losses, optimizer=optax.adam(3e-3), metrics=metrics
)
