"""The server update: how a model version's aggregated delta moves the global model.

Shaped as an optax transform: a pair of pure functions, ``init(params) -> state`` and
``update(params, delta, state) -> (new params, new state)``. FedAvg's update (server
learning rate 1, ``apply_delta``) adds the mean delta to the global model and keeps no
state. The server optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR
2021), treat the mean delta as a pseudo-gradient: ``optax_update`` feeds its negation,
``-delta``, to an optax transform (``transform_of``), so that plain SGD at rate 1 is
FedAvg again. Their state (momentum, moments, a step count) lives in the checkpoint
beside the model it applies to (``state_leaves``, ``state_from_leaves``), so a resumed
run makes bitwise the same next model.

JAX and optax are imported only when a server optimiser other than fedavg is chosen: the
aggregator of a built-in task with FedAvg loads no JAX.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedmq.aggregator.fedavg import apply_mean_delta
from fedmq.schemas.tensors import Params
from fedmq.settings import ServerOptimizerSpec, parse_server_optimizer

State = Any  # an optimiser's own NamedTuple (or nested tuples of arrays)
Arrays = Mapping[str, np.ndarray]

# The paper's settings for the adaptive optimisers (its section 5 and appendix): moment
# decays beta1 0.9 and beta2 0.99, adaptivity tau 1e-3, second moments starting at tau**2.
BETA1 = 0.9
BETA2 = 0.99
TAU = 1e-3


class ServerOptimizer(NamedTuple):
    init: Callable[[Arrays], State]  # params -> state
    update: Callable[[Arrays, Arrays, State], tuple[Params, State]]  # params, delta, state


class EmptyState(NamedTuple):
    """The state of an update that keeps none."""


def apply_delta() -> ServerOptimizer:
    """FedAvg's server update: params + delta, in the globals' dtype (``apply_mean_delta``)."""

    def init(params: Arrays) -> EmptyState:
        del params
        return EmptyState()

    def update(params: Arrays, delta: Arrays, state: State) -> tuple[Params, State]:
        return apply_mean_delta(params, delta), state

    return ServerOptimizer(init, update)


def server_optimizer(spec: str | ServerOptimizerSpec) -> ServerOptimizer:
    """The server update ``--server-optimizer`` names (``fedmq.settings``' grammar)."""
    chosen = parse_server_optimizer(spec) if isinstance(spec, str) else spec
    if chosen.name == "fedavg":
        return apply_delta()
    return optax_update(transform_of(chosen))


def transform_of(spec: ServerOptimizerSpec) -> Any:
    """The optax transform of a server optimiser, on the pseudo-gradient ``-delta``:

    - fedavgm:LR,M: ``optax.sgd(LR, momentum=M)``: ``v = M v + delta``, ``x += LR v``
      (Hsu et al.'s FedAvgM; fedavgm:1,0 is FedAvg).
    - fedadam:LR: ``optax.adam(LR, b1=0.9, b2=0.99, eps=1e-3)``: eps is the paper's
      adaptivity tau, outside the square root as there. Unlike the paper's Algorithm 2,
      optax corrects the moments' bias (the first steps are not damped by 1 - beta).
    - fedyogi:LR: ``optax.yogi(LR, b1=0.9, b2=0.99, eps=1e-3)``: Yogi's additive second
      moment, which grows more slowly than Adam's; moments start at 1e-6 = tau**2 (the
      paper's v_-1 = tau**2) and are bias-corrected as Adam's.
    - fedadagrad:LR: ``optax.adagrad(LR, initial_accumulator_value=1e-6, eps=0)``: the
      sum of squares starts at tau**2, and optax takes the root of it whole, so the
      step is ``LR delta / sqrt(tau**2 + sum delta**2)`` (the paper: ``sqrt(sum) + tau``).
    """
    import optax

    rate = spec.learning_rate
    if spec.name == "fedavgm":
        return optax.sgd(rate, momentum=spec.momentum)
    if spec.name == "fedadam":
        return optax.adam(rate, b1=BETA1, b2=BETA2, eps=TAU)
    if spec.name == "fedyogi":
        return optax.yogi(rate, b1=BETA1, b2=BETA2, eps=TAU)
    if spec.name == "fedadagrad":
        return optax.adagrad(rate, initial_accumulator_value=TAU**2, eps=0.0)
    raise ValueError(f"no optax transform for server optimizer {spec}")


def optax_update(transform: Any) -> ServerOptimizer:
    """A server update from an optax transform fed ``-delta`` as its gradient.

    Parameters stay in their dtype (float32) and numpy at the boundary: the float64 mean
    delta is rounded once to the parameters' dtype, and the new parameters come back as
    writable numpy arrays in the layout's order. The step is jitted once per process;
    XLA on one machine gives the same bits for the same inputs, so a resumed run, whose
    state comes back from the checkpoint, makes the same model."""
    import jax
    import optax

    def step(params: Arrays, delta: Arrays, state: State) -> tuple[Any, State]:
        gradient = jax.tree_util.tree_map(lambda d: -d, delta)
        updates, state = transform.update(gradient, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step)

    def init(params: Arrays) -> State:
        return transform.init(dict(params))

    def update(params: Arrays, delta: Arrays, state: State) -> tuple[Params, State]:
        rounded = {name: np.asarray(delta[name], dtype=a.dtype) for name, a in params.items()}
        new, state = jitted(dict(params), rounded, state)
        return {name: np.array(new[name]) for name in params}, state

    return ServerOptimizer(init, update)


# ---- the state in the checkpoint ---------------------------------------------------------


def state_leaves(state: State) -> list[np.ndarray] | None:
    """The state's arrays in ``jax.tree_util``'s flattening order, as numpy; None for an
    update that keeps no state (FedAvg: nothing is written, and no JAX is loaded)."""
    if isinstance(state, EmptyState):
        return None
    import jax

    return [np.array(leaf) for leaf in jax.tree_util.tree_leaves(state)]


def state_from_leaves(
    optimizer: ServerOptimizer, params: Arrays, leaves: Sequence[np.ndarray] | None
) -> State:
    """The state ``state_leaves`` gave, rebuilt onto the tree of ``optimizer.init(params)``;
    ValueError (one line) if the leaves do not fit it (their number, shapes or dtypes), or
    if the optimiser keeps state and there is none, or the other way round."""
    template = optimizer.init(params)
    if isinstance(template, EmptyState):
        if leaves:
            raise ValueError(f"{len(leaves)} arrays of state for an update that keeps none")
        return template
    if leaves is None:
        raise ValueError("no state for a server optimizer that keeps one")
    import jax
    import jax.numpy as jnp

    expected, tree = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(expected):
        raise ValueError(f"{len(leaves)} arrays of state, the optimizer keeps {len(expected)}")
    restored = []
    for index, (leaf, like) in enumerate(zip(leaves, expected, strict=True)):
        if tuple(leaf.shape) != tuple(like.shape) or np.dtype(leaf.dtype) != like.dtype:
            raise ValueError(
                f"state array {index} is {leaf.dtype}{list(leaf.shape)}, the optimizer keeps "
                f"{like.dtype}{list(like.shape)}"
            )
        restored.append(jnp.asarray(leaf, dtype=like.dtype))
    return jax.tree_util.tree_unflatten(tree, restored)
