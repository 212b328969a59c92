"""Model architectures known by name, shared by nodes (training) and aggregator (init, eval).

A global model names its architecture; a node builds the same one from this registry and
refuses parameters whose layout differs. The forward pass is written once against an
array module (``numpy`` on the aggregator, ``jax.numpy`` on nodes).
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from fedmq.schemas.tensors import Shapes

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


# Your own model, without code: ``mlp:IN-HIDDEN-...-CLASSES`` names an MLP by its layer
# sizes, e.g. ``mlp:8-32-3`` (8 features, a hidden layer of 32, 3 classes). The name travels
# in the global model, and every node builds the same architecture from it, so nothing but
# this string is shared: no code, no pickle. Bounds keep a typo from asking a Pi for
# gigabytes: at most 16 layers of at most 65,536 units and 16,000,000 parameters (64 MB of
# float32, the broker's packet limit).
SPEC_PREFIX = "mlp:"
MAX_LAYERS, MAX_UNITS, MAX_PARAMS = 16, 65_536, 16_000_000


def parse_mlp(spec: str) -> MLP:
    """``mlp:64-128-10`` -> ``MLP((64, 128, 10))``; ValueError saying what is wrong."""
    sizes = spec[len(SPEC_PREFIX) :].split("-")
    if not all(s.isdigit() and s[0] != "0" and s.isascii() for s in sizes):
        raise ValueError(
            f"model {spec!r}: after 'mlp:' give layer sizes >= 1 joined by '-', "
            "e.g. mlp:8-32-3 (inputs, hidden layers, classes)"
        )
    model = MLP(tuple(int(s) for s in sizes))
    if not 2 <= len(sizes) <= MAX_LAYERS + 1:
        raise ValueError(f"model {spec!r}: give 2 to {MAX_LAYERS + 1} layer sizes")
    if max(model.sizes) > MAX_UNITS or model.num_params > MAX_PARAMS:
        raise ValueError(
            f"model {spec!r}: too large (at most {MAX_UNITS} units per layer and "
            f"{MAX_PARAMS:,} parameters; this has {model.num_params:,})"
        )
    return model


def get_model(name: str) -> MLP:
    """A registered model by name, or an ``mlp:...`` spec (above)."""
    if name.startswith(SPEC_PREFIX):
        return parse_mlp(name)
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}, "
            "or your own as mlp:IN-HIDDEN-...-CLASSES (e.g. mlp:8-32-3)"
        ) from None


def check_layout(model_name: str, layout: Shapes) -> MLP:
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
