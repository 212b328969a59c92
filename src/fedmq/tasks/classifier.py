"""The loss and metrics of a classifier, from its class scores (logits): what the built-in
classification tasks share (the MLPs, digits-cnn, activity-cnn)."""

from typing import Any

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy of each example, shape ``(n,)``: ``y`` holds class ids."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32), axis=1)[:, 0]


def classifier_metrics(logits: jax.Array, y: jax.Array) -> dict[str, Any]:
    """Mean cross-entropy (``loss``) and ``accuracy`` over the examples."""
    return {
        "loss": jnp.mean(cross_entropy(logits, y)),
        "accuracy": jnp.mean(jnp.argmax(logits, axis=1) == y),
    }
