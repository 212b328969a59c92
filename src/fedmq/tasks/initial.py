"""A run's initial model: the shared parameters a task starts from with a seed.

One function for both ends: the aggregator makes round 1 with it, and a node told
``init_seed`` (the compressed downlink's round 1, docs/PROTOCOL.md section 12.10) builds
the same model itself instead of receiving it, then checks it against the model's id.
"""

from typing import Any, NamedTuple

import numpy as np

from fedmq.models import get_model
from fedmq.tasks.task import Task


class Initial(NamedTuple):
    params: dict[str, np.ndarray]  # the shared tensors, named as on the wire, in wire order
    template: Any  # the task's own tree (jax.eval_shape of init); None for a built-in MLP
    personal: frozenset[str]  # tensors nodes keep (Task.personal), not in params


def initial_params(source: Task | str, seed: int) -> Initial:
    """The parameters a run starts from with ``seed``: a built-in MLP's (``source`` its
    name) from ``fedmq.models`` in numpy, no JAX; a task's (``source`` the task) its
    ``flatten_params(task.init(seed_key(seed)))`` without its personal tensors. Raises what
    ``task.init`` raises, and PersonalError if ``task.personal`` fails."""
    if isinstance(source, str):
        return Initial(get_model(source).init(seed), None, frozenset())
    import jax

    from fedmq.tasks.naming import flatten_params
    from fedmq.tasks.personal import personal_names
    from fedmq.tasks.seeds import seed_key

    key = seed_key(seed)
    params = source.init(key)
    template = jax.eval_shape(source.init, key)
    personal = personal_names(source, template)
    shared = {k: v for k, v in flatten_params(params).items() if k not in personal}
    return Initial(shared, template, personal)
