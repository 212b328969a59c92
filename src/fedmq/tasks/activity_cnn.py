"""``activity-cnn``: a 1-D convolutional network over windows of a 6-axis IMU, in plain JAX.

``x`` has shape ``(n, 128, 6)`` (fedmq.tasks.activity_data: 2.56 s at 50 Hz, accelerometer
and gyroscope), ``y`` one of 6 activities. Two convolutions over time (kernel 5, 16 then 32
channels, ReLU; a max pool of 4 between them), a global average over time, a dense layer to
the classes: 3,286 parameters. Adam with its own learning rate (1e-3 times 3): a node keeps
it whatever the plan's learning rate is (fedmq.tasks.training), which SGD's 0.1 would not
suit on these unnormalised signals.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedmq.tasks.activity_data import ACTIVITIES, CHANNELS
from fedmq.tasks.classifier import classifier_metrics, cross_entropy
from fedmq.tasks.task import Task

FILTERS = (16, 32)
KERNEL = 5
POOL = 4
LEARNING_RATE = 3e-3

Params = dict[str, dict[str, jax.Array]]


def init(key: jax.Array) -> Params:
    """He-normal kernels (width, in, out), zero biases: ``conv0``, ``conv1``, ``out``."""
    k0, k1, k2 = jax.random.split(key, 3)
    f0, f1 = FILTERS
    classes = len(ACTIVITIES)
    return {
        "conv0": {"w": _he(k0, (KERNEL, CHANNELS, f0), KERNEL * CHANNELS), "b": jnp.zeros(f0)},
        "conv1": {"w": _he(k1, (KERNEL, f0, f1), KERNEL * f0), "b": jnp.zeros(f1)},
        "out": {"w": _he(k2, (f1, classes), f1), "b": jnp.zeros(classes)},
    }


def _he(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)


def conv(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    """A stride-1, same-padded convolution over time of ``(n, time, channels)``, then ReLU."""
    y = jax.lax.conv_general_dilated(
        x, layer["w"], window_strides=(1,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return jax.nn.relu(y + layer["b"])


def logits(params: Params, x: jax.Array) -> jax.Array:
    h = conv(x, params["conv0"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, POOL, 1), (1, POOL, 1), "VALID")
    h = jnp.mean(conv(h, params["conv1"]), axis=1)
    return h @ params["out"]["w"] + params["out"]["b"]


def example_losses(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Softmax cross-entropy of each example, shape ``(n,)``."""
    x, y = batch
    return cross_entropy(logits(params, x), y)


def metrics(params: Params, batch: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
    x, y = batch
    return classifier_metrics(logits(params, x), y)


def activity_cnn_task() -> Task:
    return Task(
        name="activity-cnn",
        init=init,
        loss=example_losses,
        optimizer=optax.adam(LEARNING_RATE),
        metrics=metrics,
    )
