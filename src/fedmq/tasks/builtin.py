"""The built-in models as tasks: ``digits-mlp``, ``digits-mlp-large``, ``mlp:IN-...-CLASSES``.

Same numbers as fedmq.models and the pre-task trainer (node/training.py, since removed)
used: Glorot-uniform weights from ``numpy.random.default_rng(seed)`` (the seed taken back
from the key, fedmq.tasks.seeds), softmax cross-entropy averaged over the batch, plain SGD. The
parameters are an ``MLPParams`` pytree whose tensors are named ``l0.w``, ``l0.b``,
``l1.w``, ... in that order, the wire layout of these models (docs/PROTOCOL.md, section 6).
"""

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmq.models import MLP, get_model
from fedmq.tasks.classifier import classifier_metrics, cross_entropy
from fedmq.tasks.seeds import seed_of_key
from fedmq.tasks.task import Task

DEFAULT_LEARNING_RATE = 0.1  # fedmq aggregator --learning-rate's default; plans override it


@partial(jax.tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=[])
@dataclass(frozen=True)
class Dense:
    """One layer: ``x @ w + b`` (the order of the fields is the order on the wire)."""

    w: Any
    b: Any


@dataclass(frozen=True)
class MLPParams:
    """The layers of an MLP, named ``l0``, ``l1``, ... in order (a dict would sort ``l10``
    before ``l2``)."""

    layers: tuple[Dense, ...]

    def as_named(self) -> dict[str, Any]:
        """The flat ``{"l0.w": .., "l0.b": ..}`` that fedmq.models.MLP computes with."""
        named: dict[str, Any] = {}
        for i, layer in enumerate(self.layers):
            named[f"l{i}.w"] = layer.w
            named[f"l{i}.b"] = layer.b
        return named


jax.tree_util.register_pytree_with_keys(
    MLPParams,
    lambda p: ([(jax.tree_util.DictKey(f"l{i}"), layer) for i, layer in enumerate(p.layers)], None),
    lambda _, layers: MLPParams(tuple(layers)),
    flatten_func=lambda p: (p.layers, None),
)


def mlp_params(model: MLP, named: dict[str, Any]) -> MLPParams:
    """The pytree of a flat ``{"l0.w": ..}`` parameter dict."""
    count = len(model.sizes) - 1
    return MLPParams(tuple(Dense(named[f"l{i}.w"], named[f"l{i}.b"]) for i in range(count)))


def mlp_task(name: str, learning_rate: float = DEFAULT_LEARNING_RATE) -> Task:
    """The task of a built-in model name or ``mlp:...`` spec; ValueError if it is neither."""
    model = get_model(name)
    shapes = mlp_params(
        model,
        {n: jax.ShapeDtypeStruct(shape, jnp.float32) for n, shape in model.layout.items()},
    )

    def numpy_init(key_data: np.ndarray) -> MLPParams:
        return mlp_params(model, model.init(seed_of_key(key_data)))

    def init(key: jax.Array) -> MLPParams:
        # A host callback, so that jax.eval_shape and jit trace it like any init.
        data = jax.random.key_data(key) if _is_typed_key(key) else key
        result: MLPParams = jax.pure_callback(numpy_init, shapes, data)
        return result

    def nll(params: MLPParams, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return cross_entropy(model.logits(params.as_named(), x, jnp), y)

    def metrics(params: MLPParams, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        x, y = batch
        return classifier_metrics(model.logits(params.as_named(), x, jnp), y)

    return Task(
        name=name,
        init=init,
        # One value per example: the trainer masks a padded batch with it, as the pre-task
        # trainer did (fedmq.tasks.training.example_losses).
        loss=nll,
        # The plan's learning rate replaces this one every round (fedmq.tasks.training).
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate),
        metrics=metrics,
    )


def _is_typed_key(key: Any) -> bool:
    return bool(jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key))
