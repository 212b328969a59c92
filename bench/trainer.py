"""A built-in model's local training as the node runs it (``fedmq.tasks.training``), with
named tensors in and out, for the benchmarks that train in-process."""

from typing import Any, ClassVar

import numpy as np

from fedmq.models import get_model
from fedmq.schemas import TrainingPlan
from fedmq.tasks.builtin import mlp_params
from fedmq.tasks.naming import flatten_params
from fedmq.tasks.registry import load_task
from fedmq.tasks.training import train_local


class Trainer:
    """One node's data and the built-in task ``model_name`` (compiled once per task and
    batch size, shared by every Trainer of the same task object)."""

    _tasks: ClassVar[dict[str, Any]] = {}

    def __init__(self, model_name: str, x: np.ndarray, y: np.ndarray) -> None:
        import jax.numpy as jnp

        if model_name not in self._tasks:
            self._tasks[model_name] = load_task(model_name)
        self.task = self._tasks[model_name]
        self.model = get_model(model_name)
        self.num_examples = len(y)
        self._x, self._y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

    def train(
        self,
        params: dict[str, np.ndarray],
        *,
        learning_rate: float,
        batch_size: int,
        local_epochs: int,
        seed: int,
        node_id: str,
        round: int,
    ) -> tuple[dict[str, np.ndarray], float]:
        plan = TrainingPlan(learning_rate, batch_size, local_epochs, seed)
        trained, loss = train_local(
            self.task, mlp_params(self.model, params), self._x, self._y, plan,
            node_id=node_id, round_number=round,
        )  # fmt: skip
        return flatten_params(trained), loss
