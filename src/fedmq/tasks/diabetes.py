"""``diabetes-mlp``: regression of disease progression one year on (scikit-learn's diabetes
data: 442 patients, 10 baseline measurements), mean squared error.

``x`` has shape ``(n, 10)``, standardised with the training split's mean and deviation
(fedmq.tasks.builtin_data); ``y`` is the progression score itself (float, 25 to 346). The
network (10 -> 16 tanh -> 1, 193 parameters) predicts in standard units and scales its
output by the training split's ``Y_MEAN`` and ``Y_SCALE``, constants of the task, so that
the loss it minimises is the squared error in standard units (lr 0.1 suits it) while
``mse`` and ``mae`` are in the score's own units. Predicting the mean everywhere gives an
mse of 6,803 on the test split, least-squares linear regression 2,753.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedmq.tasks.task import Task

FEATURES = 10
HIDDEN = 16
Y_MEAN = 152.0  # progression score of the training split (fedmq.tasks.builtin_data)
Y_SCALE = 76.0  # its standard deviation, rounded: constants of the task, not of a node
DEFAULT_LEARNING_RATE = 0.1

Params = dict[str, dict[str, jax.Array]]


def init(key: jax.Array) -> Params:
    k0, k1 = jax.random.split(key)
    return {
        "hidden": {"w": _glorot(k0, FEATURES, HIDDEN), "b": jnp.zeros(HIDDEN)},
        "out": {"w": _glorot(k1, HIDDEN, 1), "b": jnp.zeros(1)},
    }


def _glorot(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    limit = jnp.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit)


def standard_prediction(params: Params, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return (h @ params["out"]["w"] + params["out"]["b"])[:, 0]


def predict(params: Params, x: jax.Array) -> jax.Array:
    """The predicted progression score of each example, shape ``(n,)``."""
    return Y_MEAN + Y_SCALE * standard_prediction(params, x)


def example_losses(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Squared error of each example in standard units, shape ``(n,)``."""
    x, y = batch
    return (standard_prediction(params, x) - (y - Y_MEAN) / Y_SCALE) ** 2


def metrics(params: Params, batch: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
    x, y = batch
    error = predict(params, x) - y
    return {
        "loss": jnp.mean(example_losses(params, batch)),
        "mse": jnp.mean(error**2),
        "mae": jnp.mean(jnp.abs(error)),
    }


def diabetes_task(learning_rate: float = DEFAULT_LEARNING_RATE) -> Task:
    return Task(
        name="diabetes-mlp",
        init=init,
        loss=example_losses,
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate),
        metrics=metrics,
    )
