"""Personal parameters (``Task.personal``): leaves a node trains and keeps, never sends.

FedPer/FedRep style: a task marks part of its pytree as personal (a classifier head, say)
and the rest is federated as usual. The global model holds the shared tensors only, so the
layout fingerprint covers only those, and nodes whose personal leaves differ in shape (a
head per label set) still share one trunk. These functions split a task's named tensors
into the two parts and put them back together in the task's own order.
"""

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fedmq.tasks.layout import TaskLayout, layout_of
from fedmq.tasks.naming import named_leaves, tensor_specs
from fedmq.tasks.task import Task


class PersonalError(ValueError):
    """``Task.personal`` cannot be applied: the message says why and what to change."""


def personal_names(task: Task, template: Any) -> frozenset[str]:
    """The wire names of the leaves ``task.personal`` marks in ``template`` (the task's
    pytree, arrays or ``jax.ShapeDtypeStruct``); empty when the task has no ``personal``.
    PersonalError if it marks every leaf (nothing would be federated) or fails."""
    if task.personal is None:
        return frozenset()
    leaves = named_leaves(template)
    marked = set()
    for name, parts, _ in leaves:
        try:
            chosen = task.personal(parts)
        except Exception as error:
            raise PersonalError(
                f"task {task.name!r}: personal({parts!r}) failed: {type(error).__name__}: "
                f"{error}; it is called with each leaf's key path, a tuple of str and int"
            ) from None
        if chosen:
            marked.add(name)
    if len(marked) == len(leaves):
        raise PersonalError(
            f"task {task.name!r}: personal marks every parameter, so nothing is federated; "
            "mark only the part each node keeps (e.g. lambda path: path[0] == 'head')"
        )
    return frozenset(marked)


def split(
    named: Mapping[str, Any], personal: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared, personal) parts of named tensors, each in the order of ``named``."""
    shared = {name: value for name, value in named.items() if name not in personal}
    own = {name: value for name, value in named.items() if name in personal}
    return shared, own


def join(
    order: Iterable[str], shared: Mapping[str, Any], personal: Mapping[str, Any]
) -> dict[str, Any]:
    """The named tensors of both parts in ``order`` (the task's flattening order)."""
    return {name: personal[name] if name in personal else shared[name] for name in order}


class _Spec(NamedTuple):  # what layout_of reads of a tensor
    shape: tuple[int, ...]
    dtype: np.dtype


def shared_layout(task: Task, template: Any) -> tuple[TaskLayout, dict[str, tuple[int, ...]]]:
    """The layout a global model of ``task`` has on the wire (``template``: its init's
    shapes), over the shared tensors only since personal ones never travel, and the
    personal tensors' shapes by name. What a node checks a global model against and a
    model file is checked against. PersonalError if ``task.personal`` fails."""
    own = personal_names(task, template)
    specs = tensor_specs(template)
    shared = {name: _Spec(shape, dtype) for name, shape, dtype in specs if name not in own}
    personal = {name: shape for name, shape, _ in specs if name in own}
    return layout_of(task.name, task.version_text, shared), personal
