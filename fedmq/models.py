"""Model architectures known by name, shared by nodes (training) and aggregator (init, eval).

A global model names its architecture; a node builds the same one from this registry and
refuses parameters whose layout differs. The forward pass is written once against an
array module (``numpy`` on the aggregator, ``jax.numpy`` on nodes).
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

Params = dict[str, Any]


@dataclass(frozen=True)
class MLP:
    """Dense layers with ReLU between them and logits out."""

    sizes: tuple[int, ...]

    @property
    def layout(self) -> dict[str, tuple[int, ...]]:
        layout: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes, self.sizes[1:], strict=False)):
            layout[f"l{i}.w"] = (fan_in, fan_out)
            layout[f"l{i}.b"] = (fan_out,)
        return layout

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.layout.values())

    def init(self, seed: int) -> dict[str, np.ndarray]:
        """Glorot-uniform weights from ``numpy.random.default_rng(seed)``, zero biases, float32.

        numpy rather than jax.random so the initial model does not depend on JAX's PRNG
        implementation (which changed between releases) and the aggregator needs no JAX.
        """
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for name, shape in self.layout.items():
            if name.endswith(".w"):
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                params[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
            else:
                params[name] = np.zeros(shape, dtype=np.float32)
        return params

    def logits(self, params: Params, x: Any, xp: ModuleType = np) -> Any:
        last = len(self.sizes) - 2
        h = x
        for i in range(last + 1):
            h = h @ params[f"l{i}.w"] + params[f"l{i}.b"]
            if i < last:
                h = xp.maximum(h, 0)
        return h


MODELS: dict[str, MLP] = {
    "digits-mlp": MLP((64, 32, 10)),
    "digits-mlp-large": MLP((64, 256, 256, 10)),
}


def get_model(name: str) -> MLP:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def check_layout(model_name: str, layout: dict[str, tuple[int, ...]]) -> MLP:
    """The named model if ``layout`` is exactly its parameter layout, else ValueError."""
    model = get_model(model_name)
    if dict(layout) != model.layout:
        raise ValueError(
            f"parameter layout {dict(layout)} does not match model {model_name!r} "
            f"which has {model.layout}"
        )
    return model


def cross_entropy_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy, in numpy (float64 for the reduction)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    accuracy = (logits.argmax(axis=1) == labels).mean()
    return float(loss), float(accuracy)
