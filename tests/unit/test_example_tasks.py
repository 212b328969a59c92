"""The built-in example tasks (digits-cnn, activity-cnn, diabetes-mlp), their data sets,
and the per-node files fedmq demo --data-dir reads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmq.datasets import Dataset, digits, load_npz, partition, partition_labels, write_node_files
from fedmq.schemas.messages import TrainingPlan
from fedmq.tasks.activity_data import ACTIVITIES, CHANNELS, RATE_HZ, WINDOW, activity_data
from fedmq.tasks.builtin_data import builtin_data, split_builtin
from fedmq.tasks.naming import flatten_params, tensor_specs, unflatten_params
from fedmq.tasks.registry import builtin_names, load_task
from fedmq.tasks.seeds import seed_key
from fedmq.tasks.training import train_local

EXAMPLE_TASKS = ("digits-cnn", "activity-cnn", "diabetes-mlp")
PLAN = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=2, seed=0)


def evaluate(task_name: str, params, data: Dataset) -> dict[str, float]:
    task = load_task(task_name)
    assert task.metrics is not None
    batch = (jnp.asarray(data.x), jnp.asarray(data.y))
    return {name: float(value) for name, value in task.metrics(params, batch).items()}


def test_the_examples_are_built_in_names_and_the_mlps_stay():
    names = builtin_names()
    for name in (*EXAMPLE_TASKS, "digits-mlp", "digits-mlp-large"):
        assert name in names
        assert load_task(name).name == name
    assert load_task("mlp:8-32-3").name == "mlp:8-32-3"
    assert builtin_data("mlp:8-32-3") is None
    assert split_builtin("mlp:8-32-3", 3, "iid", 0) is None


@pytest.mark.parametrize(
    ("name", "better"),
    [
        ("digits-cnn", {"accuracy": max, "loss": min}),
        ("activity-cnn", {"accuracy": max, "loss": min}),
        ("diabetes-mlp", {"mse": min, "mae": min, "loss": min}),
    ],
)
def test_each_example_trains_and_improves_its_test_metrics(name, better):
    """Two epochs on a third of the train split, all subjects of activity-cnn (one subject
    alone does not generalise to the test subjects: that is what federating them is for)."""
    task = load_task(name)
    train, test = builtin_data(name) or (None, None)
    assert train is not None and test is not None
    params = task.init(seed_key(0))
    before = evaluate(name, params, test)
    assert set(before) == set(better)
    x, y = train.x[::3], train.y[::3]
    trained, loss = train_local(task, params, x, y, PLAN, node_id="n", round_number=1)
    after = evaluate(name, trained, test)
    assert np.isfinite(loss)
    for metric, best in better.items():
        assert best(before[metric], after[metric]) == after[metric] != before[metric], metric
    # the wire names of its params, and their way back onto its tree
    named = flatten_params(trained)
    assert list(named) == [spec[0] for spec in tensor_specs(jax.eval_shape(task.init, seed_key(0)))]
    back = unflatten_params(jax.eval_shape(task.init, seed_key(1)), named)
    assert evaluate(name, back, test) == pytest.approx(after)


def test_digits_cnn_reads_the_node_data_of_digits_mlp():
    train, _ = digits()
    x, y = jnp.asarray(train.x[:40]), jnp.asarray(train.y[:40])
    for name in ("digits-mlp", "digits-cnn"):
        task = load_task(name)
        assert task.metrics is not None
        assert np.isfinite(float(task.metrics(task.init(seed_key(0)), (x, y))["loss"]))
    names = list(flatten_params(load_task("digits-cnn").init(seed_key(0))))
    assert names == ["conv0.b", "conv0.w", "conv1.b", "conv1.w", "out.b", "out.w"]


def test_the_diabetes_split_is_standardised_with_float_targets():
    data = builtin_data("diabetes-mlp")
    assert data is not None
    train, test = data
    assert (train.x.shape, test.x.shape) == ((354, 10), (88, 10))
    assert train.y.dtype == np.float32 and test.y.dtype == np.float32
    np.testing.assert_allclose(train.x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(axis=0), 1, atol=1e-5)
    assert 25 <= train.y.min() < train.y.max() <= 346


# --------------------------------------------------------------------------- activity data


def test_the_activity_data_is_shaped_as_documented_and_deterministic():
    x, y = activity_data([0, 1], windows_per_activity=3, seed=0)
    assert (WINDOW, CHANNELS, RATE_HZ) == (128, 6, 50)  # 2.56 s at 50 Hz, acc + gyro
    assert x.shape == (2 * 6 * 3, 128, 6) and x.dtype == np.float32
    assert y.dtype == np.int32
    assert y.tolist() == [a for _ in range(2) for a in range(len(ACTIVITIES)) for _ in range(3)]
    again = activity_data([0, 1], windows_per_activity=3, seed=0)
    assert x.tobytes() == again[0].tobytes()
    # subject 1 is the same whichever subjects are asked for; another seed, other people
    alone = activity_data([1], windows_per_activity=3, seed=0)
    assert alone[0].tobytes() == x[18:].tobytes()
    assert not np.allclose(activity_data([1], 3, seed=1)[0], alone[0])
    assert np.isfinite(x).all()


def test_the_activity_data_carries_gravity_and_gait():
    x, y = activity_data(range(4), windows_per_activity=5, seed=0)
    gravity = np.linalg.norm(x[:, :, :3].mean(axis=1), axis=1)
    np.testing.assert_allclose(gravity, 1.0, atol=0.1)  # 1 g, whatever the sensor's tilt
    moving = x[y <= 2, :, :3].std(axis=1).mean()
    still = x[y >= 3, :, :3].std(axis=1).mean()
    assert moving > 4 * still
    # per subject differences: the mean direction of gravity when standing differs
    standing = [
        x[(y == 4) & (np.arange(len(y)) // 30 == s), :, :3].mean(axis=(0, 1)) for s in range(4)
    ]
    assert (
        min(np.linalg.norm(a - b) for i, a in enumerate(standing) for b in standing[i + 1 :]) > 0.01
    )


def test_activity_nodes_are_subjects_and_dirichlet_skews_their_activities():
    shards, test = split_builtin("activity-cnn", 3, "iid", 0) or ([], None)
    assert test is not None and len(test) == 4 * 6 * 20
    for subject, shard in enumerate(shards):
        x, _ = activity_data([subject], 20, 0)
        assert shard.x.tobytes() == x.tobytes()
    skewed, _ = split_builtin("activity-cnn", 3, "dirichlet:0.1", 0) or ([], None)
    for shard in skewed:
        counts = np.bincount(shard.y, minlength=6)
        assert counts.max() == 20 and counts.min() < 20
    again, _ = split_builtin("activity-cnn", 3, "dirichlet:0.1", 0) or ([], None)
    assert [s.y.tolist() for s in again] == [s.y.tolist() for s in skewed]


# --------------------------------------------------------------------------- partitions, files


def test_digits_shards_are_the_demos_partition():
    train, _ = digits()
    shards, _ = split_builtin("digits-cnn", 4, "dirichlet:0.5", 7) or ([], None)
    for shard, part in zip(shards, partition(train.y, 4, "dirichlet:0.5", 7), strict=True):
        assert shard.y.tolist() == train.y[part].tolist()


def test_a_regression_is_partitioned_over_the_deciles_of_y():
    y = np.linspace(0.0, 1.0, 100, dtype=np.float32)
    labels = partition_labels(y)
    assert np.bincount(labels).tolist() == [10] * 10
    classes = np.array([3, 1, 2], dtype=np.int32)
    assert partition_labels(classes) is classes
    data = builtin_data("diabetes-mlp")
    assert data is not None
    shards = partition(partition_labels(data[0].y), 5, "dirichlet:0.1", 0)
    means = [float(data[0].y[s].mean()) for s in shards]
    assert max(means) - min(means) > 50  # skewed: some nodes see milder cases than others


def test_node_files_round_trip_through_load_npz(tmp_path):
    train, test = digits()
    paths = write_node_files(train, test, 3, "iid", 0, tmp_path / "data")
    assert [p.name for p in paths] == ["node-01.npz", "node-02.npz", "node-03.npz"]
    parts = partition(train.y, 3, "iid", 0)
    for path, part in zip(paths, parts, strict=True):
        loaded = load_npz(path)
        assert loaded.x.tobytes() == train.x[part].tobytes()
        assert loaded.y.tolist() == train.y[part].tolist()
    loaded = load_npz(tmp_path / "data" / "test.npz")
    assert loaded.x.tobytes() == test.x.tobytes() and loaded.y.tolist() == test.y.tolist()
    many = write_node_files(train, test, 100, "iid", 0, tmp_path / "many")
    assert many[0].name == "node-001.npz" and sorted(many) == many


@pytest.mark.parametrize("name", ["activity-cnn", "diabetes-mlp"])
def test_node_files_keep_any_shape_of_x_and_float_y(tmp_path, name):
    data = builtin_data(name)
    assert data is not None
    train, test = data
    paths = write_node_files(train, test, 4, "dirichlet:0.5", 0, tmp_path)
    shards = [np.load(path) for path in paths]
    assert sum(len(s["y"]) for s in shards) == len(train)
    for shard in shards:
        assert shard["x"].shape[1:] == train.x.shape[1:] and shard["x"].dtype == np.float32
        assert shard["y"].dtype == train.y.dtype
    with np.load(tmp_path / "test.npz") as saved:
        assert saved["x"].tobytes() == test.x.tobytes()
        assert saved["y"].tobytes() == test.y.tobytes()
