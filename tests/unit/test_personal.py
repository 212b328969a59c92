"""Personal parameters: splitting a task's tensors into shared and personal, and the
node's saved personal tensors (crash-safe like the residual)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmq.node import personal, saved_tensors
from fedmq.node.saved_tensors import SavedTensors
from fedmq.tasks import Task
from fedmq.tasks.naming import flatten_params
from fedmq.tasks.personal import PersonalError, join, personal_names, split


def headed_task(personal_rule: Any = lambda path: path[0] == "head") -> Task:
    def init(key: jax.Array) -> dict[str, Any]:
        k1, k2 = jax.random.split(key)
        return {
            "trunk": {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3)},
            "head": {"w": jax.random.normal(k2, (3, 2)), "b": jnp.zeros(2)},
        }

    def loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        h = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
        return jnp.mean((h @ params["head"]["w"] + params["head"]["b"] - y) ** 2)

    return Task(
        name="headed", init=init, loss=loss, optimizer=optax.sgd(0.1), personal=personal_rule
    )


def test_personal_names_follow_the_rule():
    task = headed_task()
    template = jax.eval_shape(task.init, jax.random.key(0))
    assert personal_names(task, template) == {"head.w", "head.b"}
    assert personal_names(headed_task(None), template) == frozenset()
    assert personal_names(headed_task(lambda path: path == ("trunk", "b")), template) == {"trunk.b"}


def test_split_and_join_give_back_the_task_order():
    task = headed_task()
    named = flatten_params(task.init(jax.random.key(1)))
    shared, own = split(named, personal_names(task, named_tree(task)))
    assert list(shared) == ["trunk.b", "trunk.w"]  # dict keys sorted, as jax flattens them
    assert list(own) == ["head.b", "head.w"]
    joined = join(named, shared, own)
    assert list(joined) == list(named)
    assert all(joined[name] is named[name] for name in named)


def named_tree(task: Task) -> Any:
    return jax.eval_shape(task.init, jax.random.key(0))


def test_a_rule_that_marks_everything_or_fails_is_refused():
    template = named_tree(headed_task())
    with pytest.raises(
        PersonalError, match="personal marks every parameter, so nothing is federated"
    ):
        personal_names(headed_task(lambda path: True), template)
    with pytest.raises(PersonalError, match=r"personal\(\('head', 'b'\)\) failed: IndexError"):
        personal_names(headed_task(lambda path: path[5] == "x"), template)


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "head.b": rng.normal(size=2).astype(np.float32),
        "head.w": rng.normal(size=(3, 2)).astype(np.float32),
    }


LAYOUT = {"head.b": (2,), "head.w": (3, 2)}


def test_saved_personal_tensors_carry_over_to_any_later_round_of_the_same_task():
    saved = SavedTensors(round=3, tag="f" * 32, tensors=tensors(0))
    assert personal.usable(saved, round_number=4, fingerprint="f" * 32, layout=LAYOUT) is None
    assert personal.usable(saved, round_number=9, fingerprint="f" * 32, layout=LAYOUT) is None
    assert "a new run" in personal.usable(
        saved, round_number=3, fingerprint="f" * 32, layout=LAYOUT
    )
    assert "another task" in personal.usable(
        saved, round_number=4, fingerprint="e" * 32, layout=LAYOUT
    )
    other = {"head.b": (3,), "head.w": (3, 3)}
    assert "personal parameters" in personal.usable(
        saved, round_number=4, fingerprint="f" * 32, layout=other
    )
    assert (
        personal.usable(None, round_number=1, fingerprint="f" * 32, layout=LAYOUT) == "none saved"
    )


def test_pending_personal_tensors_settle_with_the_update_on_record(tmp_path):
    path, pending = tmp_path / personal.FILE, tmp_path / personal.PENDING
    saved_tensors.save(path, SavedTensors(2, "t", tensors(2)))
    saved_tensors.save(pending, SavedTensors(3, "t", tensors(3)))
    saved_tensors.settle(pending, path, on_record=2)  # round 3's update never went on record
    kept = saved_tensors.load(path)
    assert not pending.exists() and kept is not None and kept.round == 2
    saved_tensors.save(pending, SavedTensors(3, "t", tensors(3)))
    saved_tensors.settle(pending, path, on_record=3)  # it did: promote
    kept = saved_tensors.load(path)
    assert not pending.exists() and kept is not None and kept.round == 3
    assert all(np.array_equal(kept.tensors[n], a) for n, a in tensors(3).items())
