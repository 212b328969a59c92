"""A custom fedmq task: a small 1-D convolution that tells sensor windows apart
(0 = sine, 1 = square wave, 2 = noise). Copy it to my_task.py, then:

    python my_task.py data                             # writes data/node-{1,2,3}.npz, test.npz
    fedmq demo --task my_task:task --data-dir data --workdir run
    fedmq export --state-dir run/aggregator --out model.npz

and predict: apply(fedmq.load_params("model.npz", task), x).argmax(-1) (docs/python-api.md).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmq import Task

WINDOW, CHANNELS, CLASSES = 64, 8, 3


def init(key):
    conv, head = jax.random.split(key)
    return {  # nested dicts: on the wire conv.b, conv.w, head.b, head.w
        "conv": {"w": 0.5 * jax.random.normal(conv, (5, 1, CHANNELS)), "b": jnp.zeros(CHANNELS)},
        "head": {"w": 0.5 * jax.random.normal(head, (CHANNELS, CLASSES)), "b": jnp.zeros(CLASSES)},
    }


def apply(params, x):
    """Class scores of windows ``x`` (n, WINDOW) -> (n, CLASSES)."""
    h = jax.lax.conv_general_dilated(
        x[:, :, None], params["conv"]["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    h = jax.nn.relu(h + params["conv"]["b"]).mean(axis=1)
    return h @ params["head"]["w"] + params["head"]["b"]


def loss(params, batch):  # one value per example; fedmq averages them
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)


def metrics(params, batch):
    x, y = batch
    logits = apply(params, x)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
        "accuracy": (logits.argmax(-1) == y).mean(),
    }


task = Task(name="sensor-cnn", init=init, loss=loss, optimizer=optax.adam(1e-2), metrics=metrics)


def windows(n, seed):
    """``n`` labelled windows: x (n, WINDOW) float32, y (n,) class ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    wave = np.sin(rng.uniform(0.2, 0.6, (n, 1)) * np.arange(WINDOW) + rng.uniform(0, 6, (n, 1)))
    x = np.where(y[:, None] == 0, wave, np.sign(wave))
    x = np.where(y[:, None] == 2, rng.normal(0, 1, (n, WINDOW)), x)
    return (x + rng.normal(0, 0.2, x.shape)).astype(np.float32), y


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, seed in [("node-1", 1), ("node-2", 2), ("node-3", 3), ("test", 0)]:
        x, y = windows(300, seed)
        np.savez(out / f"{name}.npz", x=x, y=y)
