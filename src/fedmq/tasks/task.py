"""``fedmq.Task``: what a federation learns, as plain functions and an optax optimizer.

This module imports neither JAX nor optax, so ``import fedmq`` and ``fedmq --help`` stay
free of them (an import-linter contract keeps it so); the functions a task holds bring
their own.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# A task's name travels in the global model (its ``model`` field) and in log lines.
TASK_NAME = re.compile(r"[A-Za-z0-9_.:+/-]{1,64}")

# The parts of a parameter's key path, as ``Task.personal`` sees them: dict keys and
# attribute names as str, sequence indices as int (fedmq.tasks.naming).
KeyPath = tuple[str | int, ...]


class Optimizer(Protocol):
    """What fedmq uses of an ``optax.GradientTransformation``: ``init(params) -> state`` and
    ``update(grads, state, params) -> (updates, state)``."""

    @property
    def init(self) -> Callable[..., Any]: ...

    @property
    def update(self) -> Callable[..., Any]: ...


@dataclass(frozen=True)
class Task:
    """What is learnt: initial parameters, the loss, the optimizer nodes run, metrics.

    ``init(key) -> params``: any pytree of float32 (or float16) arrays from a JAX PRNG key.
    ``loss(params, batch) -> scalar``: ``batch = (x, y)``, leading axis = examples; the mean
    of a per-example loss, minimised batch by batch. It may instead return the per-example
    losses (shape ``(n,)``), which fedmq averages itself (fedmq.tasks.training).
    ``optimizer``: an ``optax.GradientTransformation`` run on the node. Its state starts
    anew every round (fedmq.tasks.training). One built with ``optax.inject_hyperparams``
    that has a ``learning_rate`` takes the federation's learning rate (the plan's);
    any other keeps its own.
    ``metrics(params, batch) -> {"name": scalar}``: optional, each an average over the
    batch's examples.
    ``version``: optional; part of the layout fingerprint, so nodes running another version
    of the same task refuse the global model. Change it when the meaning of the
    parameters changes but their names and shapes do not.
    ``personal(path) -> bool``: optional; marks leaves (by their key path, e.g.
    ``lambda path: path[0] == "head"``) that stay on the node, never sent nor averaged
    (FedPer): each node trains them with the rest and keeps them in its state directory;
    the global model and its fingerprint hold the shared leaves only.
    """

    name: str
    init: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    optimizer: Optimizer
    metrics: Callable[[Any, Any], Mapping[str, Any]] | None = None
    version: str | int | None = None
    personal: Callable[[KeyPath], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME.fullmatch(self.name):
            raise ValueError(
                f"task name {self.name!r}: give 1 to 64 characters from A-Z a-z 0-9 _ . : + / -"
            )
        for field in ("init", "loss"):
            if not callable(getattr(self, field)):
                raise TypeError(f"task {self.name!r}: {field} must be a function")
        optimizer = self.optimizer
        if not (
            callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))
        ):
            raise TypeError(
                f"task {self.name!r}: optimizer must be an optax.GradientTransformation "
                f"(e.g. optax.sgd(0.1)), not {type(optimizer).__name__}"
            )
        for field in ("metrics", "personal"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"task {self.name!r}: {field} must be a function or None")
        version = self.version
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, str | int)
        ):
            raise TypeError(f"task {self.name!r}: version must be a str or an int, e.g. '2'")

    @property
    def version_text(self) -> str | None:
        """The declared version as it enters the fingerprint (``2`` and ``"2"`` are one)."""
        return None if self.version is None else str(self.version)
