"""Local training of any task: jit-compiled epochs of ``task.optimizer`` steps on ``task.loss``.

Each epoch visits the node's examples in a seeded order (``seeds.epoch_order``, as the
pre-task trainer did) in batches of ``plan.batch_size``, the last one padded to full size
with a mask, so an epoch compiles once per (task, batch size, number of examples). A
batch's loss is the mean of its real examples' losses: the padding weighs nothing. A task
whose loss returns one value per example (shape ``(n,)``, as the built-in tasks' does)
gives them in one batched pass, the same arithmetic as the pre-task trainer's, bit for bit
(tests/unit/test_tasks.py); a loss that returns a scalar is taken on each example alone
(``jax.vmap`` over batches of one). Either way the loss must be a mean of per-example
terms (cross-entropy, squared error, ...): a loss that compares the examples of a batch
with each other (contrastive, batch statistics) is not one fedmq can train.

The optimizer's state starts anew every round, from the global model: it describes the
trajectory of the parameters this node trained last round, which the new global replaces,
and a state kept across rounds would make a node's update depend on its history (and on
whether it restarted), which nothing on the wire could replay. An optimizer built with
``optax.inject_hyperparams`` that has a ``learning_rate`` takes the plan's.

FedProx (``plan.proximal_mu`` = mu > 0, Li et al. 2020): each step minimises the batch's
mean loss plus ``(mu / 2) * ||w - w_global||^2`` once (the term is the batch's, not each
example's), ``w_global`` the global model the round started from, over every leaf but the
task's personal ones. It is a second compiled epoch (one per task, batch size and
``mu != 0``; mu is an argument): with mu 0 the epoch is the one of every run before it.

The node trains every task through ``train_local`` (the built-in MLPs bit for bit as
the removed node/training.py did before tasks, tests/unit/test_training.py), after ``data_problem``
has checked once that its data can train the task.
"""

from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmq.schemas.messages import TrainingPlan
from fedmq.tasks.seeds import epoch_order
from fedmq.tasks.task import Task

Epoch = Callable[..., tuple[Any, Any, jax.Array]]


def example_losses(task: Task, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """The loss of each example of the batch (x, y): shape ``(len(x),)``.

    A loss that returns one value per example is used as it is (one batched pass); one
    that returns a scalar is taken on each example alone (batches of one, ``jax.vmap``).
    """
    direct = task.loss(params, (x, y))  # traced only: unused (scalar) it compiles to nothing
    shape = tuple(jnp.shape(direct))
    if shape == (len(x),):
        return jnp.asarray(direct)
    if shape != ():
        raise ValueError(
            f"task {task.name!r}: loss must return a scalar (or one value per example), "
            f"it returned shape {shape} for {len(x)} examples"
        )
    return jax.vmap(lambda xi, yi: task.loss(params, (xi[None], yi[None])))(x, y)


def anchored_leaves(task: Task, params: Any) -> tuple[bool, ...]:
    """For each leaf of ``params`` in flattening order: does FedProx's term hold it to the
    global model? Every leaf but the task's personal ones (``Task.personal``): those never
    travel, so the global model the round started from does not hold them."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if task.personal is None:
        return (True,) * len(leaves)
    from fedmq.tasks.naming import key_path_parts

    return tuple(not task.personal(key_path_parts(path)) for path, _ in leaves)


def proximal_term(
    params: Any, anchor: Any, mu: jax.Array | float, anchored: tuple[bool, ...]
) -> jax.Array:
    """FedProx's ``(mu / 2) * ||params - anchor||^2`` (Li et al. 2020) over the leaves
    ``anchored`` marks, summed in float32."""
    pairs = zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(anchor), anchored, strict=True
    )
    squares = [jnp.sum(jnp.square((p - a).astype(jnp.float32))) for p, a, keep in pairs if keep]
    return 0.5 * mu * sum(squares, jnp.float32(0.0))


def batch_loss(task: Task, params: Any, batch: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """The mean of the real examples' losses of a batch ``(x, y, mask)``: the padding
    (mask 0) weighs nothing."""
    xb, yb, mb = batch
    losses = example_losses(task, params, xb, yb)
    return jnp.sum(losses * mb) / jnp.maximum(jnp.sum(mb), 1.0)


def proximal_objective(
    task: Task,
    params: Any,
    batch: tuple[jax.Array, jax.Array, jax.Array],
    anchor: Any,
    mu: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """(what a FedProx step minimises, the batch's task loss): the batch's mean loss plus
    the proximal term once, not once per example. Its gradient is the task loss's plus
    ``mu * (params - anchor)`` on the anchored leaves."""
    loss = batch_loss(task, params, batch)
    return loss + proximal_term(params, anchor, mu, anchored_leaves(task, params)), loss


def make_epoch(task: Task, batch_size: int, proximal: bool = False) -> Epoch:
    """``epoch(params, opt_state, x, y, order, mask) -> (params, opt_state, mean_loss)``,
    jitted; with ``proximal``, ``epoch(..., mask, anchor, mu)`` adds FedProx's term
    (``proximal_objective``) to each step, ``anchor`` the global model the round started
    from and ``mu`` an argument, so one compile serves every mu.

    ``order`` and ``mask`` come from ``epoch_order``: whole batches, the padding masked out.
    A batch's loss is the mean of its real examples' losses (``example_losses``), so every
    step has one shape and the padding weighs nothing. ``mean_loss`` is the mean over the
    real examples of the task's loss their batch had before its step (without the term).
    """
    return _epoch(task, batch_size, proximal)  # one cache key however it is called


@lru_cache(maxsize=16)
def _epoch(task: Task, batch_size: int, proximal: bool) -> Epoch:
    Batch = tuple[jax.Array, jax.Array, jax.Array]
    Gradient = Callable[[Any, Batch], tuple[jax.Array, Any]]  # (task loss, grads)

    def step_by(gradient: Gradient) -> Callable[..., tuple[tuple[Any, Any], jax.Array]]:
        def step(carry: tuple[Any, Any], batch: Batch) -> tuple[tuple[Any, Any], jax.Array]:
            params, opt_state = carry
            loss, grads = gradient(params, batch)
            updates, opt_state = task.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss * jnp.sum(batch[2])

        return step

    def run(
        step: Callable[..., tuple[tuple[Any, Any], jax.Array]],
        params: Any, opt_state: Any, x: jax.Array, y: jax.Array, order: jax.Array,
        mask: jax.Array,
    ) -> tuple[Any, Any, jax.Array]:  # fmt: skip
        batches = (
            x[order].reshape(-1, batch_size, *x.shape[1:]),
            y[order].reshape(-1, batch_size, *y.shape[1:]),
            mask.reshape(-1, batch_size),
        )
        (params, opt_state), weighted = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, jnp.sum(weighted) / jnp.sum(mask)

    if not proximal:  # the task's loss alone: the steps of every run before FedProx

        @jax.jit
        def epoch(
            params: Any, opt_state: Any, x: jax.Array, y: jax.Array, order: jax.Array,
            mask: jax.Array,
        ) -> tuple[Any, Any, jax.Array]:  # fmt: skip
            gradient = jax.value_and_grad(partial(batch_loss, task))
            return run(step_by(gradient), params, opt_state, x, y, order, mask)

        return epoch

    @jax.jit
    def proximal_epoch(
        params: Any, opt_state: Any, x: jax.Array, y: jax.Array, order: jax.Array,
        mask: jax.Array, anchor: Any, mu: jax.Array,
    ) -> tuple[Any, Any, jax.Array]:  # fmt: skip
        def gradient(params: Any, batch: Batch) -> tuple[jax.Array, Any]:
            objective = partial(proximal_objective, task, batch=batch, anchor=anchor, mu=mu)
            (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return loss, grads

        return run(step_by(gradient), params, opt_state, x, y, order, mask)

    return proximal_epoch


def delta(trained: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """What a node sends: trained minus the global it started from, tensor by tensor in the
    global's order, in float32."""
    return {name: (np.asarray(trained[name]) - b).astype(np.float32) for name, b in base.items()}


def data_problem(task: Task, template: Any, x: Any, y: Any) -> str | None:
    """Why (x, y) cannot train ``task`` (its params' tree ``template``), in one line, or None.

    The built-in MLPs say it as they always have (features, class ids); any other task's
    loss is traced once on one example (``jax.eval_shape``: nothing is computed) and its
    error, if any, is the cause."""
    if len(x) == 0 or len(x) != len(y):
        return f"x and y must hold the same number (> 0) of examples, not {len(x)} and {len(y)}"
    from fedmq.tasks.builtin import MLPParams

    if isinstance(template, MLPParams):
        features, classes = template.layers[0].w.shape[0], template.layers[-1].w.shape[1]
        if np.ndim(x) != 2 or np.shape(x)[1] != features:
            found = f"{np.shape(x)[1]} features" if np.ndim(x) == 2 else f"shape {np.shape(x)[1:]}"
            return f"data has {found}, the model expects {features}"
        if not np.issubdtype(np.asarray(y).dtype, np.integer):
            return (
                f"labels must be class ids 0..{classes - 1}, found {np.asarray(y).dtype} values:"
                " store y.astype(int) if they are whole numbers"
            )
        if np.ndim(y) != 1:
            return (
                f"labels must be class ids 0..{classes - 1}, one per example (n,), found shape "
                f"{np.shape(y)}: store y.reshape(-1) if each example has one"
            )
        low, high = int(np.min(y)), int(np.max(y))
        if low < 0 or high >= classes:
            return f"labels must be class ids 0..{classes - 1}, found {low}..{high}"
        return None
    one_x = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), np.asarray(x[:1]).dtype)
    one_y = jax.ShapeDtypeStruct((1, *np.shape(y)[1:]), np.asarray(y[:1]).dtype)
    try:
        jax.eval_shape(lambda p, xb, yb: example_losses(task, p, xb, yb), template, one_x, one_y)
    except Exception as error:
        text = str(error).strip()
        first = text.splitlines()[0] if text else "(no message)"
        return (
            f"its loss fails on one example of x {list(np.shape(x)[1:])} {one_x.dtype} and y "
            f"{list(np.shape(y)[1:])} {one_y.dtype}: {type(error).__name__}: {first}"
        )
    return None


@lru_cache(maxsize=16)
def make_start(task: Task) -> Callable[[Any, float], Any]:
    """``start(params, learning_rate) -> opt_state``: the optimizer's fresh state for a round
    with the plan's learning rate (``with_learning_rate``), jitted: one call to the device
    instead of one per state array (most of a small model's time per round, unjitted)."""

    @jax.jit
    def start(params: Any, learning_rate: Any) -> Any:
        return with_learning_rate(task.optimizer.init(params), learning_rate)

    return start


def with_learning_rate(opt_state: Any, learning_rate: float) -> Any:
    """``opt_state`` with its injected ``learning_rate`` set, or unchanged if it has none."""
    hyperparams = getattr(opt_state, "hyperparams", None)
    if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
        return opt_state
    current = hyperparams["learning_rate"]
    value = jnp.asarray(learning_rate, dtype=jnp.result_type(current))
    return opt_state._replace(hyperparams={**hyperparams, "learning_rate": value})


def train_local(
    task: Task,
    params: Any,
    x: Any,
    y: Any,
    plan: TrainingPlan,
    *,
    node_id: str,
    round_number: int,
) -> tuple[Any, float]:
    """``plan.local_epochs`` epochs from ``params`` (the global model's pytree) on (x, y):
    the trained pytree and the mean training loss of the last epoch (the task's loss,
    without FedProx's term). With ``plan.proximal_mu`` > 0 every step also pulls the
    federated leaves towards ``params`` (``proximal_objective``)."""
    num_examples = len(x)
    if num_examples == 0 or len(y) != num_examples:
        raise ValueError(
            f"x and y must hold the same number (> 0) of examples, not {len(x)} and {len(y)}"
        )
    mu = plan.proximal_mu
    epoch = make_epoch(task, plan.batch_size, mu != 0)
    opt_state = make_start(task)(params, plan.learning_rate)
    x, y = jnp.asarray(x), jnp.asarray(y)
    # FedProx: held to the global model the round started from (params, as received)
    proximal = () if mu == 0 else (params, jnp.float32(mu))
    loss: Any = np.float32(np.nan)
    for index in range(plan.local_epochs):
        order, mask = epoch_order(
            num_examples,
            plan.batch_size,
            seed=plan.seed,
            node_id=node_id,
            round_number=round_number,
            epoch=index,
        )
        params, opt_state, loss = epoch(params, opt_state, x, y, order, mask, *proximal)
    return params, float(loss)
