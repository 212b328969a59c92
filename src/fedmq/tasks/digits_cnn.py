"""``digits-cnn``: a small convolutional network on the 8x8 digits, in plain JAX.

It reads the same data as ``digits-mlp`` (``x`` of shape ``(n, 64)``, pixels / 16, row by
row) and reshapes it to ``(n, 8, 8, 1)`` itself, so the same node files serve both tasks.
Two 3x3 convolutions (8 then 16 channels, ReLU), a 2x2 max pool, and a dense layer to the
10 classes: 3,818 parameters (digits-mlp has 2,410), He-normal weights drawn from the
init key, softmax cross-entropy per example. The optimizer is SGD with the federation's
learning rate (``optax.inject_hyperparams``), like digits-mlp's, so one plan runs both.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedmq.tasks.classifier import classifier_metrics, cross_entropy
from fedmq.tasks.task import Task

IMAGE = 8  # pixels per side
CLASSES = 10
CHANNELS = (8, 16)  # the two convolutions' output channels
KERNEL = 3
DEFAULT_LEARNING_RATE = 0.1

Params = dict[str, dict[str, jax.Array]]


def init(key: jax.Array) -> Params:
    """He-normal kernels (HWIO), zero biases; names ``conv0.w``, ``conv0.b``, ..., ``out.w``."""
    k0, k1, k2 = jax.random.split(key, 3)
    c0, c1 = CHANNELS
    flat = (IMAGE // 2) ** 2 * c1
    return {
        "conv0": {"w": _he(k0, (KERNEL, KERNEL, 1, c0), KERNEL * KERNEL), "b": jnp.zeros(c0)},
        "conv1": {"w": _he(k1, (KERNEL, KERNEL, c0, c1), KERNEL * KERNEL * c0), "b": jnp.zeros(c1)},
        "out": {"w": _he(k2, (flat, CLASSES), flat), "b": jnp.zeros(CLASSES)},
    }


def _he(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)


def conv(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    """A stride-1, same-padded convolution of NHWC ``x`` with an HWIO kernel, then ReLU."""
    y = jax.lax.conv_general_dilated(
        x,
        layer["w"],
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return jax.nn.relu(y + layer["b"])


def logits(params: Params, x: jax.Array) -> jax.Array:
    """Class scores of ``x``, shape ``(n, 64)`` as digits-mlp reads it."""
    h = x.reshape(-1, IMAGE, IMAGE, 1)
    h = conv(conv(h, params["conv0"]), params["conv1"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.reshape(len(x), -1) @ params["out"]["w"] + params["out"]["b"]


def example_losses(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Softmax cross-entropy of each example, shape ``(n,)``."""
    x, y = batch
    return cross_entropy(logits(params, x), y)


def metrics(params: Params, batch: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
    x, y = batch
    return classifier_metrics(logits(params, x), y)


def digits_cnn_task(learning_rate: float = DEFAULT_LEARNING_RATE) -> Task:
    return Task(
        name="digits-cnn",
        init=init,
        loss=example_losses,
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate),
        metrics=metrics,
    )
