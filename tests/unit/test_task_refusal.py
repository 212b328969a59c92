"""A node refuses a global model of another task in one line naming the difference:
``node.app.expected_layout`` (the layout the node's task puts on the wire) against the
aggregator's fingerprint of the same task, and ``node.app.mismatch`` against a global
model whose task name, version, tensor names, shapes or dtypes differ."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import structlog

from fedmq.aggregator.app import run_task
from fedmq.datasets import Dataset
from fedmq.node.app import expected_layout, mismatch
from fedmq.schemas import GlobalModel, TrainingPlan, decode_global, encode, model_id_of
from fedmq.tasks import Task
from fedmq.tasks.builtin import mlp_task
from fedmq.tasks.layout import layout_of


def tiny_task(**changes: Any) -> Task:
    """Nested-dict params ``{"dense": {"b": (2,), "w": (3, 2)}}`` and a version."""

    def init(key: jax.Array) -> dict[str, Any]:
        return {"dense": {"w": jax.random.normal(key, (3, 2)) * 0.1, "b": jnp.zeros(2)}}

    def loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = x @ params["dense"]["w"] + params["dense"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    fields: dict[str, Any] = {
        "name": "tiny",
        "init": init,
        "loss": loss,
        "optimizer": optax.sgd(0.1),
        "version": "1",
    }
    return Task(**(fields | changes))


def global_of(
    params: dict[str, np.ndarray],
    *,
    model: str = "tiny",
    version: str | None = "1",
    fingerprint: str | None = "from-layout",
) -> GlobalModel:
    """A global model as an aggregator of task ``model`` version ``version`` sends it,
    encoded and decoded as a node receives it."""
    if fingerprint == "from-layout":
        fingerprint = layout_of(model, version, params).fingerprint
    message = GlobalModel(
        federation="fed",
        round=1,
        model=model,
        model_id=model_id_of(params),
        params=params,
        plan=TrainingPlan(0.1, 16, 1, 0),
        task_version=version,
        task_fingerprint=fingerprint,
    )
    return decode_global(encode(message))


def f32(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


TINY = {"dense.b": f32(2), "dense.w": f32(3, 2)}


def test_a_matching_global_model_has_no_difference():
    _, expected, _ = expected_layout(tiny_task())
    assert mismatch(expected, global_of(TINY)) is None
    assert expected.fingerprint == global_of(TINY).task_fingerprint


@pytest.mark.parametrize(
    ("model", "difference"),
    [
        (
            global_of(TINY, model="small"),
            "task 'small' where 'tiny' was expected",
        ),
        (
            global_of(TINY, version="2"),
            "task 'tiny' version '2' where '1' was expected",
        ),
        (
            global_of(TINY, version=None),
            "task 'tiny' version (none) where '1' was expected",
        ),
        (
            global_of({"dense.bias": f32(2), "dense.w": f32(3, 2)}),
            "tensor 1 is 'dense.bias' where 'dense.b' was expected (2 tensors, 2 expected)",
        ),
        (
            global_of({"dense.b": f32(2), "dense.w": f32(3, 3)}),
            "tensor 'dense.w' has shape [3, 3] where [3, 2] was expected",
        ),
        (
            global_of({"dense.b": f32(2), "dense.w": f32(3, 2).astype(np.float16)}),
            "tensor 'dense.w' is float16 where float32 was expected",
        ),
        (
            global_of({"dense.b": f32(2)}),
            "tensor 'dense.w' is missing (1 tensors, 2 expected)",
        ),
        (
            global_of(TINY | {"head.w": f32(2)}),
            "tensor 'head.w' is not expected (3 tensors, 2 expected)",
        ),
        (
            # same layout, another fingerprint: a field the node cannot see differs
            global_of(TINY, fingerprint="0" * 32),
            f"task fingerprint {'0' * 32} where {layout_of('tiny', '1', TINY).fingerprint} "
            "was expected",
        ),
    ],
    ids=[
        "name",
        "version",
        "no-version",
        "tensor-name",
        "shape",
        "dtype",
        "missing",
        "extra",
        "fingerprint",
    ],
)
def test_a_mismatched_global_model_is_named_in_one_line(model, difference):
    _, expected, _ = expected_layout(tiny_task())
    assert mismatch(expected, model) == difference


def test_an_older_aggregator_without_a_fingerprint_is_checked_by_its_layout():
    _, expected, _ = expected_layout(tiny_task(version=None))
    assert mismatch(expected, global_of(TINY, version=None, fingerprint=None)) is None
    assert mismatch(expected, global_of({"dense.b": f32(3), "dense.w": f32(3, 2)},
                                        version=None, fingerprint=None)) == (
        "tensor 'dense.b' has shape [3] where [2] was expected"
    )  # fmt: skip


def test_an_int_version_is_its_text_on_both_sides():
    _, node, _ = expected_layout(tiny_task(version=2))
    assert mismatch(node, global_of(TINY, version="2")) is None


@pytest.mark.parametrize("spec", ["digits-mlp", "mlp:64-32-10"])
def test_the_aggregator_and_the_node_agree_on_a_builtin_tasks_fingerprint(spec):
    """The aggregator builds a built-in task's params in numpy, the node its layout from
    ``jax.eval_shape`` of the task: one fingerprint, or every node refuses every model."""
    aggregator = run_task(spec, seed=0)
    _, node, _ = expected_layout(mlp_task(spec))
    assert layout_of(aggregator.name, aggregator.version, aggregator.params) == node


def test_the_aggregator_and_the_node_agree_on_a_custom_tasks_fingerprint(tmp_path, monkeypatch):
    (tmp_path / "tiny_task_module.py").write_text(
        "from tests.unit.test_task_refusal import tiny_task\ntask = tiny_task(version=3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    aggregator = run_task("tiny_task_module:task", seed=5)
    _, node, _ = expected_layout(tiny_task(version=3))
    assert layout_of(aggregator.name, aggregator.version, aggregator.params) == node
    assert aggregator.version == "3"


def test_builtin_tasks_of_other_sizes_differ_by_name_first():
    _, node, _ = expected_layout(mlp_task("mlp:64-32-10"))
    aggregator = run_task("mlp:64-16-10", seed=0)
    model = global_of(
        aggregator.params,
        model=aggregator.name,
        version=None,
    )
    assert mismatch(node, model) == "task 'mlp:64-16-10' where 'mlp:64-32-10' was expected"
    # and, were the names equal, the shapes would be named
    renamed = dataclasses.replace(model, model="mlp:64-32-10")
    renamed = dataclasses.replace(
        renamed, task_fingerprint=layout_of("mlp:64-32-10", None, aggregator.params).fingerprint
    )
    assert mismatch(node, renamed) == "tensor 'l0.w' has shape [64, 16] where [64, 32] was expected"


# ------------------------------------------------------------- the node: refused once


def test_a_refused_model_is_refused_once_per_connection_not_once_per_copy(tmp_path):
    """Round 1 reaches a connected node on both global topics; the retained copy again
    after a reconnect, whose "online" status must then be corrected."""
    from fedmq.mqtt import BrokerAddress
    from fedmq.node.app import Node
    from fedmq.node.settings import NodeSettings
    from fedmq.schemas import Topics, decode_status
    from tests.unit.test_node_restart import RecordingOutbox

    config = NodeSettings(broker=BrokerAddress(), federation="fed", node_id="pi-1",
                          state_dir=tmp_path)  # fmt: skip
    data = Dataset(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    outbox = RecordingOutbox()
    node = Node(config, data, outbox, task=mlp_task("mlp:64-32-10"))  # type: ignore[arg-type]
    aggregator = run_task("digits-mlp", seed=0)
    payload = encode(global_of(aggregator.params, model="digits-mlp", version=None))

    def states() -> list[str]:
        status = Topics("fed").status("pi-1")
        return [decode_status(p).state for t, p in outbox.sent if t == status]

    with structlog.testing.capture_logs() as logs:
        node.on_connected()
        node.on_global(payload)
        node.on_global_delta(payload)  # round 1's full model on the compact topic
        assert states() == ["online", "error"]
        node.on_connected()  # a reconnect: subscribed again, the retained copy again
        node.on_global(payload, retained=True)
    assert states() == ["online", "error", "online", "error"]
    assert [e["event"] for e in logs].count("global.refused") == 2
    assert not [t for t, _ in outbox.sent if t == Topics("fed").update("pi-1")]


# ------------------------------------------------------------- the aggregator: resume refused

KEPT_TASKS = {
    "kept_v1": "dataclasses.replace(mlp_task('mlp:64-16-10'), name='digits-small', version=1)",
    "kept_v2": "dataclasses.replace(mlp_task('mlp:64-16-10'), name='digits-small', version=2)",
    "kept_wide": "dataclasses.replace(mlp_task('mlp:64-32-10'), name='digits-small', version=1)",
}


@pytest.mark.parametrize(
    ("module", "difference"),
    [
        ("kept_v2", "task 'digits-small' version '2' where '1' was expected"),
        ("kept_wide", "tensor 'l0.w' has shape [64, 32] where [64, 16] was expected"),
    ],
)
def test_an_aggregator_does_not_resume_a_run_of_another_task_version_or_layout(
    tmp_path, monkeypatch, module, difference
):
    """The kept settings hold the task's name only; its version and layout are checked
    against the kept global model's fingerprint."""
    from fedmq.aggregator.app import build_aggregator, resume_or_start
    from fedmq.aggregator.checkpoint import CheckpointError, StateDir
    from fedmq.aggregator.settings import AggregatorSettings

    for name, made in KEPT_TASKS.items():
        (tmp_path / f"{name}.py").write_text(
            f"import dataclasses\nfrom fedmq.tasks.builtin import mlp_task\ntask = {made}\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    state = tmp_path / "state"

    def settings(spec: str) -> AggregatorSettings:
        return AggregatorSettings(federation="fed", task=spec, nodes=1, rounds=2, test_data=None)

    store = StateDir(state)
    build_aggregator(settings("kept_v1:task"), lambda *_: None, store).start()
    store.close()
    store = StateDir(state)
    assert resume_or_start(build_aggregator(settings("kept_v1:task"), lambda *_: None), store)
    store.close()
    other = build_aggregator(settings(f"{module}:task"), lambda *_: None)
    store = StateDir(state)
    with pytest.raises(CheckpointError) as error:
        resume_or_start(other, store)
    store.close()
    text = str(error.value)
    assert text.startswith(f"--task digits-small: {difference}, unlike the run kept in {state}")
    assert "\n" not in text
