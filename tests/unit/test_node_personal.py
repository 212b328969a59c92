"""A node with a task that has personal parameters and a plan that holds out examples:
what it sends (shared tensors only, the received model's held-out metrics) and what it
keeps (its personal tensors, crash-safe, carried into the next round)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import structlog

from fedmq import Task
from fedmq.datasets import Dataset
from fedmq.mqtt import BrokerAddress
from fedmq.node import personal, saved_tensors
from fedmq.node.app import Node
from fedmq.node.settings import NodeSettings
from fedmq.schemas import GlobalModel, Topics, TrainingPlan, decode_update, encode, model_id_of
from fedmq.tasks.naming import flatten_params
from fedmq.tasks.seeds import seed_key

from .node_doubles import RecordingOutbox

FEDERATION = "unit-personal"
TOPICS = Topics(FEDERATION)
FEATURES, CLASSES = 6, 3


def init(key):
    trunk, head = jax.random.split(key)
    return {
        "trunk": {"w": 0.3 * jax.random.normal(trunk, (FEATURES, 8)), "b": jnp.zeros(8)},
        "head": {"w": 0.3 * jax.random.normal(head, (8, CLASSES)), "b": jnp.zeros(CLASSES)},
    }


def logits(params, x):
    hidden = jax.nn.relu(x @ params["trunk"]["w"] + params["trunk"]["b"])
    return hidden @ params["head"]["w"] + params["head"]["b"]


def loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def metrics(params, batch):
    x, y = batch
    return {"loss": loss(params, batch), "accuracy": (logits(params, x).argmax(-1) == y).mean()}


TASK = Task(
    name="unit-personal",
    init=init,
    loss=loss,
    optimizer=optax.sgd(0.1),
    metrics=metrics,
    personal=lambda path: path[0] == "head",
)
PERSONAL = ("head.b", "head.w")


def shared_params(seed: int = 0) -> dict[str, np.ndarray]:
    everything = flatten_params(init(seed_key(seed)))
    return {name: array for name, array in everything.items() if name not in PERSONAL}


def global_model(round: int, params=None, eval_fraction: float = 0.0) -> GlobalModel:
    params = shared_params() if params is None else params
    plan = TrainingPlan(
        learning_rate=0.1, batch_size=8, local_epochs=1, seed=0, eval_fraction=eval_fraction
    )
    return GlobalModel(
        federation=FEDERATION, round=round, model=TASK.name, model_id=model_id_of(params),
        params=params, plan=plan,
    )  # fmt: skip


def make_node(state: Path, examples: int = 40) -> tuple[Node, RecordingOutbox]:
    rng = np.random.default_rng(1)
    data = Dataset(rng.normal(size=(examples, FEATURES)).astype(np.float32),
                   rng.integers(0, CLASSES, examples))  # fmt: skip
    config = NodeSettings(
        broker=BrokerAddress(), federation=FEDERATION, node_id="pi-1", state_dir=state
    )
    outbox = RecordingOutbox()
    return Node(config, data, outbox, task=TASK), outbox  # type: ignore[arg-type]


def test_personal_tensors_never_leave_the_node(tmp_path: Path) -> None:
    node, outbox = make_node(tmp_path)
    with structlog.testing.capture_logs():
        node.on_global(encode(global_model(1)))
    (payload,) = outbox.on(TOPICS.update("pi-1"))
    update = decode_update(payload)
    assert sorted(update.delta) == ["trunk.b", "trunk.w"]
    kept = saved_tensors.load(tmp_path / personal.FILE)
    assert kept is not None and kept.round == 1 and sorted(kept.tensors) == list(PERSONAL)
    for name in PERSONAL:  # neither the names nor the trained values are in the bytes
        assert name.encode() not in payload
        assert kept.tensors[name].astype(np.float32).tobytes() not in payload
    initial = flatten_params(init(seed_key(0)))
    assert not np.allclose(kept.tensors["head.w"], initial["head.w"])  # trained on the node
    assert not (tmp_path / personal.PENDING).exists()


def test_the_kept_head_carries_into_the_next_round(tmp_path: Path) -> None:
    node, _ = make_node(tmp_path)
    with structlog.testing.capture_logs() as first:
        node.on_global(encode(global_model(1)))
    after_one = saved_tensors.load(tmp_path / personal.FILE)
    restarted, outbox = make_node(tmp_path)  # a new process: only the disk carries it
    with structlog.testing.capture_logs() as second:
        restarted.on_global(encode(global_model(2)))
    assert [e["event"] for e in first].count("personal.initialised") == 1
    assert "personal.initialised" not in [e["event"] for e in second]
    after_two = saved_tensors.load(tmp_path / personal.FILE)
    assert after_one is not None and after_two is not None and after_two.round == 2
    assert len(outbox.on(TOPICS.update("pi-1"))) == 1
    # a new run (round 1 again) starts the head afresh from the task's init
    fresh, _ = make_node(tmp_path)
    with structlog.testing.capture_logs() as third:
        fresh.on_global(encode(global_model(1, params=shared_params(seed=0))))
    assert [e["event"] for e in third].count("personal.initialised") == 1


def test_a_global_model_that_carries_the_personal_tensors_is_refused(tmp_path: Path) -> None:
    node, outbox = make_node(tmp_path)
    everything = flatten_params(init(seed_key(0)))  # an aggregator unaware of personal
    with structlog.testing.capture_logs():
        node.on_global(encode(global_model(1, params=everything)))
    assert outbox.on(TOPICS.update("pi-1")) == []
    status = outbox.on(TOPICS.status("pi-1"))[-1]
    assert b"does not match task 'unit-personal'" in status and b"head" in status


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_the_plans_held_out_examples_are_evaluated_not_trained(tmp_path, fraction) -> None:
    node, outbox = make_node(tmp_path, examples=40)
    with structlog.testing.capture_logs():
        node.on_global(encode(global_model(1, eval_fraction=fraction)))
    update = decode_update(outbox.on(TOPICS.update("pi-1"))[0])
    if fraction == 0.0:
        assert update.metrics is None and update.eval_examples is None
        assert update.num_examples == 40
    else:
        assert update.eval_examples == 10 and update.num_examples == 30
        assert update.metrics is not None and set(update.metrics) == {"loss", "accuracy"}
        assert 0.0 <= update.metrics["accuracy"] <= 1.0 and update.metrics["loss"] > 0


def test_a_model_file_of_a_personal_task_loads_with_a_nodes_own_head(tmp_path: Path) -> None:
    import fedmq
    from fedmq.model_file import ModelFileError, write_model

    (tmp_path / "node").mkdir()  # as the node's run() makes it
    node, _ = make_node(tmp_path / "node")
    with structlog.testing.capture_logs():
        node.on_global(encode(global_model(1)))
    path = tmp_path / "model.npz"
    write_model(path, encode(global_model(1)))
    initial = flatten_params(init(seed_key(0)))
    as_initial = fedmq.load_params(path, TASK)
    np.testing.assert_array_equal(as_initial["head"]["w"], initial["head.w"])
    np.testing.assert_array_equal(as_initial["trunk"]["w"], shared_params()["trunk.w"])
    own = saved_tensors.load(tmp_path / "node" / personal.FILE)
    assert own is not None
    as_node = fedmq.load_params(path, TASK, personal=own.tensors)
    np.testing.assert_array_equal(as_node["head"]["w"], own.tensors["head.w"])
    with pytest.raises(ModelFileError, match="personal tensors"):
        fedmq.load_params(path, TASK, personal={"head.w": own.tensors["head.w"]})


def test_another_tasks_model_is_refused_as_such_even_when_the_data_does_not_fit(tmp_path):
    """The node's data fits neither task: the line names the task difference (the fix is
    the --task), not a shape error of the node's own task."""
    from fedmq.models import get_model

    rng = np.random.default_rng(0)
    data = Dataset(rng.normal(size=(20, 64)).astype(np.float32), rng.integers(0, 10, 20))
    config = NodeSettings(
        broker=BrokerAddress(), federation=FEDERATION, node_id="pi-1", state_dir=tmp_path
    )
    outbox = RecordingOutbox()
    node = Node(config, data, outbox, task=TASK)  # type: ignore[arg-type]
    params = get_model("digits-mlp").init(0)
    other = GlobalModel(
        federation=FEDERATION, round=1, model="digits-mlp", model_id=model_id_of(params),
        params=params, plan=TrainingPlan(learning_rate=0.1, batch_size=8, local_epochs=1, seed=0),
    )  # fmt: skip
    with structlog.testing.capture_logs():
        node.on_global(encode(other))
    assert outbox.on(TOPICS.update("pi-1")) == []
    status = outbox.on(TOPICS.status("pi-1"))[-1]
    assert b"does not match task 'unit-personal'" in status
    assert b"digits-mlp" in status and b"local data" not in status
