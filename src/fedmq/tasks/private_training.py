"""DP-SGD on a node (Abadi et al. 2016): per-example clipping, Gaussian noise, Poisson batches.

With ``plan.dp_sgd`` = (Z, C), a round is ``privacy.steps_per_round`` steps, and each step:

1. **samples** a Poisson batch: every training example is in it with probability
   q = batch_size / n, independently of the others and of the other steps (so the batch
   size varies, B = q n on average). This is exactly the sampling the accountant assumes
   (``fedmq.privacy``: ``PoissonSampledDpEvent``); shuffled fixed-size batches, which plain
   training uses, are not. The sample is laid out in a padded block of fixed width with
   a mask (``poisson_batches``; the width depends on n and q only), so a node compiles
   its DP round once;
2. takes **each sampled example's gradient** (``jax.vmap`` of the gradient of the task's
   loss on that example alone, ``training.example_losses``) and **clips** it to L2 norm C
   over all parameters together, personal ones included (``clipped_sum``): one example
   moves the sum by at most C;
3. **adds noise** N(0, (Z C)^2) to every coordinate of the sum and divides by B, the
   expected batch size (not the drawn one, which would itself depend on the data);
4. hands that noisy mean gradient (plus FedProx's term, which depends on no example) to
   the task's optimizer, as plain training does.

Everything the node publishes is computed from these noisy gradients and the global
model, so it is post-processing: the delta, its compression and error feedback, the
personal tensors kept on the node. The mean loss returned is not private; the node uses
it only to detect divergence and does not send it.

Randomness comes in as arguments (a numpy generator for the samples, a JAX key for the
noise): the node draws them from a secret kept in its privacy ledger, never from the
plan's seed, which the aggregator knows (with it, it could recompute the noise and
subtract it, and see which examples each step used).
"""

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmq.privacy import sampling_rate, steps_per_round
from fedmq.schemas.messages import DpSgd, TrainingPlan
from fedmq.tasks.task import Task
from fedmq.tasks.training import anchored_leaves, example_losses, make_start

# A Poisson batch is padded to a fixed width: the expected size plus SPARE_SDS standard
# deviations, rounded up to a multiple of WIDTH_STEP. The width then depends only on the
# node's examples and the plan, so a node compiles its DP round once (each new width is a
# JIT compile: seconds on a laptop, a minute on a loaded Pi); a sample above it (odds
# below 1e-8 a step) widens that round's block, never cuts the sample.
WIDTH_STEP = 16
SPARE_SDS = 6.0

Batch = tuple[jax.Array, jax.Array, jax.Array]


def poisson_batches(
    rng: np.random.Generator, num_examples: int, q: float, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` Poisson samples of ``range(num_examples)``, each index in each independently
    with probability ``q``: ``(indices, mask)`` of shape (steps, width), the indices of a
    step's sample first (ascending) then 0 padding, mask 1 for sampled and 0 for padding.
    ``width``: the expected size plus SPARE_SDS standard deviations, or the largest sample
    if larger, rounded up to a multiple of WIDTH_STEP: no sample is ever cut."""
    chosen = [np.flatnonzero(rng.random(num_examples) < q) for _ in range(steps)]
    spread = SPARE_SDS * math.sqrt(num_examples * q * (1.0 - q))
    largest = max([math.ceil(num_examples * q + spread), *(len(c) for c in chosen)])
    width = max(WIDTH_STEP, -(-largest // WIDTH_STEP) * WIDTH_STEP)
    indices = np.zeros((steps, width), dtype=np.int32)
    mask = np.zeros((steps, width), dtype=np.float32)
    for step, sample in enumerate(chosen):
        indices[step, : len(sample)] = sample
        mask[step, : len(sample)] = 1.0
    return indices, mask


def clipped_sum(
    task: Task, params: Any, x: jax.Array, y: jax.Array, mask: jax.Array, clip: jax.Array | float
) -> tuple[Any, jax.Array]:
    """(sum over the examples with mask 1 of their gradients, each clipped to L2 norm
    ``clip`` over all leaves; the examples' losses). Float32 sums, leaves in the params'
    dtypes. The padding (mask 0) adds nothing."""

    def one(xi: jax.Array, yi: jax.Array) -> tuple[jax.Array, Any]:
        return jax.value_and_grad(lambda p: example_losses(task, p, xi[None], yi[None])[0])(params)

    losses, grads = jax.vmap(one)(x, y)
    leaves = jax.tree_util.tree_leaves(grads)
    width = mask.shape[0]
    squares = sum(
        (jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(width, -1), axis=1) for g in leaves),
        jnp.zeros((width,), jnp.float32),
    )
    factor = mask / jnp.maximum(1.0, jnp.sqrt(squares) / clip)
    summed = jax.tree_util.tree_map(
        lambda g: jnp.tensordot(factor, g.astype(jnp.float32), axes=1), grads
    )
    return summed, losses


def noised_mean(
    summed: Any, key: jax.Array, dp: tuple[jax.Array, jax.Array], expected: jax.Array
) -> Any:
    """``(summed + N(0, (Z C)^2) per coordinate) / expected`` with ``dp`` = (Z, C): one
    independent normal per coordinate, a key per leaf split from ``key``."""
    noise, clip = dp
    leaves, tree = jax.tree_util.tree_flatten(summed)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        (leaf + noise * clip * jax.random.normal(k, leaf.shape, jnp.float32)) / expected
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


PrivateRound = Callable[..., tuple[Any, Any, jax.Array]]


def make_private_round(task: Task, proximal: bool = False) -> PrivateRound:
    """``run(params, opt_state, x, y, indices, mask, key, dp, expected[, anchor, mu]) ->
    (params, opt_state, mean loss of the sampled examples)``, jitted: every step of a round
    in one ``lax.scan`` over the rows of (indices, mask). ``dp`` = (Z, C) and ``expected``
    (B) are arguments, so one compile serves every setting of a width."""
    return _private_round(task, proximal)


@lru_cache(maxsize=16)
def _private_round(task: Task, proximal: bool) -> PrivateRound:
    @jax.jit
    def run(
        params: Any, opt_state: Any, x: jax.Array, y: jax.Array, indices: jax.Array,
        mask: jax.Array, key: jax.Array, dp: tuple[jax.Array, jax.Array], expected: jax.Array,
        anchor: Any = None, mu: Any = None,
    ) -> tuple[Any, Any, jax.Array]:  # fmt: skip
        anchored = anchored_leaves(task, params)

        def step(carry: tuple[Any, Any], row: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
            params, opt_state = carry
            chosen, weights, number = row
            summed, losses = clipped_sum(task, params, x[chosen], y[chosen], weights, dp[1])
            grads = noised_mean(summed, jax.random.fold_in(key, number), dp, expected)
            grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
            if proximal:  # FedProx's term: the same for any data, so added after the noise
                grads = jax.tree_util.tree_unflatten(
                    jax.tree_util.tree_structure(grads),
                    [
                        g + mu * (p - a) if keep else g
                        for g, p, a, keep in zip(
                            jax.tree_util.tree_leaves(grads),
                            jax.tree_util.tree_leaves(params),
                            jax.tree_util.tree_leaves(anchor),
                            anchored,
                            strict=True,
                        )
                    ],
                )
            updates, opt_state = task.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), (jnp.sum(losses * weights), jnp.sum(weights))

        numbers = jnp.arange(indices.shape[0], dtype=jnp.uint32)
        (params, opt_state), (total, count) = jax.lax.scan(
            step, (params, opt_state), (indices, mask, numbers)
        )
        return params, opt_state, jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0)

    return run


def train_private(
    task: Task,
    params: Any,
    x: Any,
    y: Any,
    plan: TrainingPlan,
    dp: DpSgd,
    *,
    rng: np.random.Generator,
    key: jax.Array,
) -> tuple[Any, float]:
    """One round of DP-SGD from ``params`` on (x, y): ``privacy.steps_per_round`` steps of
    Poisson rate ``privacy.sampling_rate`` (the plan's batch size and epochs), drawn from
    ``rng``, noised from ``key``. The trained pytree and the mean loss of the sampled
    examples (not private: for the node's divergence check only)."""
    num_examples = len(x)
    if num_examples == 0 or len(y) != num_examples:
        raise ValueError(
            f"x and y must hold the same number (> 0) of examples, not {len(x)} and {len(y)}"
        )
    q = sampling_rate(num_examples, plan.batch_size)
    steps = steps_per_round(num_examples, plan.batch_size, plan.local_epochs)
    indices, mask = poisson_batches(rng, num_examples, q, steps)
    mu = plan.proximal_mu
    run = make_private_round(task, mu != 0)
    opt_state = make_start(task)(params, plan.learning_rate)
    settings = (jnp.float32(dp.noise), jnp.float32(dp.clip))
    expected = jnp.float32(q * num_examples)
    proximal = () if mu == 0 else (params, jnp.float32(mu))
    params, _, loss = run(
        params, opt_state, jnp.asarray(x), jnp.asarray(y), indices, mask, key, settings,
        expected, *proximal,
    )  # fmt: skip
    return params, float(loss)
