"""``fedmq.tasks.evaluation.evaluate_task``: example-weighted metrics over batches equal the
whole set's, a task without metrics still gives its loss, NaN stays NaN, regressions; and
the aggregator's central evaluation of a task that is not built in reports that task's
metric names in ``RoundMetrics.metrics.central``."""

import math
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmq.aggregator.app import RunTask, build_aggregator
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.datasets import Dataset
from fedmq.schemas import NodeUpdate, Topics, decode_global, decode_metrics, encode
from fedmq.tasks import Task
from fedmq.tasks.evaluation import evaluate_task
from fedmq.tasks.naming import flatten_params, unflatten_params
from fedmq.tasks.seeds import seed_key

FEATURES, CLASSES = 5, 3


def classifier(metrics: Any = "accuracy", **changes: Any) -> Task:
    """A linear softmax classifier; ``metrics``: "accuracy", None, or a function."""

    def init(key: jax.Array) -> dict[str, Any]:
        return {"w": jax.random.normal(key, (FEATURES, CLASSES)), "b": jnp.zeros(CLASSES)}

    def loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = x @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def accuracy(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> dict:
        x, y = batch
        return {"accuracy": jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y)}

    chosen = accuracy if metrics == "accuracy" else metrics
    fields = {"name": "linear-classifier", "init": init, "loss": loss,
              "optimizer": optax.sgd(0.1), "metrics": chosen}  # fmt: skip
    return Task(**(fields | changes))


def regressor() -> Task:
    """A linear regression: mean squared error as its loss, and its MAE and MSE metrics."""

    def init(key: jax.Array) -> dict[str, Any]:
        return {"w": jax.random.normal(key, (FEATURES,)), "b": jnp.zeros(())}

    def predict(params: dict[str, Any], x: jax.Array) -> jax.Array:
        return x @ params["w"] + params["b"]

    def loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return jnp.mean((predict(params, x) - y) ** 2)

    def metrics(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> dict:
        x, y = batch
        error = predict(params, x) - y
        return {"mae": jnp.mean(jnp.abs(error)), "mse": jnp.mean(error**2)}

    return Task(name="linear-regression", init=init, loss=loss, optimizer=optax.sgd(0.01),
                metrics=metrics)  # fmt: skip


def classes_data(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, count)


def regression_data(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, FEATURES)).astype(np.float32)
    return x, (x @ np.arange(1, FEATURES + 1) + rng.normal(size=count)).astype(np.float32)


def numpy_classifier_metrics(params: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict:
    logits = x.astype(np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {
        "accuracy": float(np.mean(logits.argmax(axis=1) == y)),
        "loss": float(-np.mean(log_probs[np.arange(len(y)), y])),
    }


@pytest.mark.parametrize("batch_size", [1, 7, 50, 64, 256])
def test_example_weighted_batches_give_the_whole_sets_metrics(batch_size):
    task = classifier()
    params = task.init(seed_key(0))
    x, y = classes_data(50)
    got = evaluate_task(task, params, x, y, batch_size=batch_size)
    assert list(got) == ["accuracy", "loss"]
    want = numpy_classifier_metrics(params, x, y)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)  # float32 means
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_a_partial_last_batch_weighs_by_its_examples_not_as_one_batch():
    """50 = 3 x 16 + 2: a mean of batch means would give the last 2 examples 1/4 weight."""
    task = classifier()
    params = task.init(seed_key(1))
    x, y = classes_data(50, seed=1)
    per_batch = [
        numpy_classifier_metrics(params, x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)
    ]
    unweighted = float(np.mean([m["accuracy"] for m in per_batch]))
    got = evaluate_task(task, params, x, y, batch_size=16)["accuracy"]
    assert got == pytest.approx(numpy_classifier_metrics(params, x, y)["accuracy"], abs=1e-6)
    assert got != pytest.approx(unweighted, abs=1e-4)


def test_a_task_without_metrics_gives_its_loss():
    task = classifier(metrics=None)
    params = task.init(seed_key(0))
    x, y = classes_data(20)
    got = evaluate_task(task, params, x, y, batch_size=8)
    assert list(got) == ["loss"]
    assert got["loss"] == pytest.approx(numpy_classifier_metrics(params, x, y)["loss"], rel=1e-5)


def test_the_loss_is_the_mean_per_example_loss_even_if_a_metric_is_named_loss():
    task = classifier(metrics=lambda params, batch: {"loss": jnp.float32(123.0)})
    params = task.init(seed_key(0))
    x, y = classes_data(20)
    got = evaluate_task(task, params, x, y)
    assert got["loss"] == pytest.approx(numpy_classifier_metrics(params, x, y)["loss"], rel=1e-5)


def test_a_regression_task_reports_its_own_metrics_with_float_targets():
    task = regressor()
    params = task.init(seed_key(0))
    x, y = regression_data(30)
    got = evaluate_task(task, params, x, y, batch_size=4)
    assert list(got) == ["loss", "mae", "mse"]
    error = x.astype(np.float64) @ np.asarray(params["w"], np.float64) - y
    assert got["mse"] == pytest.approx(np.mean(error**2), rel=1e-5)
    assert got["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    assert got["loss"] == pytest.approx(got["mse"], rel=1e-6)  # loss = MSE, per example


def test_a_diverged_model_gives_nan_not_an_error():
    task = classifier()
    params = task.init(seed_key(0))
    params = {"w": params["w"].at[0, 0].set(jnp.nan), "b": params["b"]}
    x, y = classes_data(20)
    got = evaluate_task(task, params, x, y, batch_size=8)
    assert math.isnan(got["loss"])
    assert 0.0 <= got["accuracy"] <= 1.0  # argmax of NaN logits is still a class


def test_one_nan_example_makes_the_whole_loss_nan_not_left_out():
    task = regressor()
    params = task.init(seed_key(0))
    x, y = regression_data(30)
    y[17] = np.nan
    got = evaluate_task(task, params, x, y, batch_size=8)
    assert math.isnan(got["loss"]) and math.isnan(got["mae"])


@pytest.mark.parametrize(
    ("x", "y", "batch_size", "message"),
    [
        (np.zeros((0, FEATURES), np.float32), np.zeros(0, np.int32), 8, r"same number \(> 0\)"),
        (np.zeros((3, FEATURES), np.float32), np.zeros(2, np.int32), 8, "not 3 and 2"),
        (np.zeros((3, FEATURES), np.float32), np.zeros(3, np.int32), 0, "batch_size must be"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(x, y, batch_size, message):
    task = classifier()
    with pytest.raises(ValueError, match=message) as error:
        evaluate_task(task, task.init(seed_key(0)), x, y, batch_size=batch_size)
    assert "\n" not in str(error.value)


def test_a_metric_that_is_not_a_scalar_is_refused_by_name():
    task = classifier(metrics=lambda params, batch: {"per_class": jnp.zeros(CLASSES)})
    x, y = classes_data(4)
    with pytest.raises(ValueError) as error:
        evaluate_task(task, task.init(seed_key(0)), x, y)
    assert str(error.value) == (
        "task 'linear-classifier': metric 'per_class' must be a scalar, it has shape (3,)"
    )


# ------------------------------------------------------------- the aggregator's central part


def scored_classifier() -> Task:
    """The classifier with metrics of its own names: accuracy and mean top probability."""

    def scores(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> dict:
        x, y = batch
        logits = x @ params["w"] + params["b"]
        return {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "confidence": jnp.mean(jnp.max(jax.nn.softmax(logits), -1)),
        }

    return classifier(metrics=scores, name="scored-classifier")


CUSTOM_MODULE = textwrap.dedent(
    """
    from tests.unit.test_task_evaluation import scored_classifier

    task = scored_classifier()
    """
)


def test_the_aggregators_central_metrics_of_a_custom_task_are_its_own(tmp_path, monkeypatch):
    """Through build_aggregator as `fedmq aggregator --task MODULE:ATTR --test-data F.npz`
    makes it: a round closed on one update reports the task's metric names, measured on
    the new model."""
    (tmp_path / "scored_task_module.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = classes_data(40, seed=3)
    Dataset(x, y).save(tmp_path / "test.npz")
    config = AggregatorSettings(
        federation="fed", task="scored_task_module:task", nodes=1, rounds=2,
        test_data=str(tmp_path / "test.npz"), seed=4,
    )  # fmt: skip
    published: list[tuple[str, bytes, bool]] = []
    aggregator = build_aggregator(config, lambda t, p, r: published.append((t, p, r)))
    aggregator.start()
    topics = Topics("fed")
    (start,) = [decode_global(p) for t, p, _ in published if t == topics.global_model]
    assert start.model == "scored-classifier"
    assert start.plan.eval_fraction == 0.0  # a test set: no federated evaluation by default
    delta = {name: np.full_like(a, 0.25) for name, a in start.params.items()}
    update = NodeUpdate(federation="fed", node_id="pi-1", round=1, base_model_id=start.model_id,
                        num_examples=10, train_loss=1.0, train_seconds=0.1, delta=delta)  # fmt: skip
    aggregator.handle(topics.update("pi-1"), encode(update))

    (metrics,) = [decode_metrics(p) for t, p, _ in published if t == topics.metrics]
    assert metrics.metrics is not None and metrics.metrics.federated is None
    central = metrics.metrics.central
    assert central is not None and sorted(central) == ["accuracy", "confidence", "loss"]
    task = scored_classifier()
    new = {name: a + 0.25 for name, a in start.params.items()}
    template = jax.eval_shape(task.init, seed_key(4))
    want = evaluate_task(task, unflatten_params(template, new), x, y)
    assert central == pytest.approx(want, rel=1e-6)
    assert (metrics.loss, metrics.accuracy) == pytest.approx((want["loss"], want["accuracy"]))


def test_the_central_evaluator_of_a_regression_task_gives_its_metrics():
    """task_evaluator on float targets (the .npz route to it waits for load_npz to take a
    float y: branch issue13-datadir)."""
    task = regressor()
    template = jax.eval_shape(task.init, seed_key(0))
    run = RunTask(task.name, None, flatten_params(task.init(seed_key(0))), None, task, template)
    x, y = regression_data(30, seed=2)
    evaluator = run.evaluator(Dataset(x, y))
    assert evaluator is not None
    got = evaluator(run.params)
    assert sorted(got) == ["loss", "mae", "mse"]
    assert got == pytest.approx(evaluate_task(task, task.init(seed_key(0)), x, y))
    assert run.evaluator(None) is None


# ------------------------------------------------------------- a built-in task needs no JAX

NO_JAX = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fedmq.aggregator.app import RunTask, build_aggregator
    from fedmq.aggregator.settings import AggregatorSettings
    from fedmq.schemas import NodeUpdate, Topics, decode_global, decode_metrics, encode

    published = []
    config = AggregatorSettings(federation="fed", task=sys.argv[1], nodes=1, rounds=2,
                                test_data="digits")
    aggregator = build_aggregator(config, lambda t, p, r: published.append((t, p, r)))
    aggregator.start()
    topics = Topics("fed")
    start = decode_global([p for t, p, _ in published if t == topics.global_model][0])
    assert start.task_fingerprint is not None
    delta = {name: np.full_like(a, 0.01) for name, a in start.params.items()}
    update = NodeUpdate(federation="fed", node_id="pi-1", round=1, base_model_id=start.model_id,
                        num_examples=10, train_loss=1.0, train_seconds=0.1, delta=delta)
    aggregator.handle(topics.update("pi-1"), encode(update))
    metrics = decode_metrics([p for t, p, _ in published if t == topics.metrics][0])
    print(sorted(metrics.metrics.central))
    print(sorted(m for m in ("jax", "jaxlib", "optax") if m in sys.modules))
    """
)


@pytest.mark.parametrize("task", ["digits-mlp", "mlp:64-16-10"])
def test_the_aggregator_of_a_builtin_task_runs_a_round_without_jax(task):
    """aggregator/evaluate.py: 'the aggregator of a built-in task needs no JAX'. Built,
    started, a round closed and evaluated: jax never imported."""
    result = subprocess.run(
        [sys.executable, "-c", NO_JAX, task], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["['accuracy', 'loss']", "[]"]


def test_the_no_jax_check_sees_jax_for_a_task_that_needs_it():
    """The same script on digits-cnn (built in, but a JAX model): jax is there, so the
    check above can fail."""
    result = subprocess.run(
        [sys.executable, "-c", NO_JAX, "digits-cnn"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["['accuracy', 'loss']", "['jax', 'jaxlib', 'optax']"]


# ------------------------------------------------------------- a test set that does not fit


@pytest.mark.parametrize(
    ("task", "x", "y", "problem"),
    [
        (
            "mlp:64-16-10",
            np.zeros((6, 8), np.float32),
            np.zeros(6, np.int64),
            "it holds x of shape (6, 8), the model takes (n, 64)",
        ),
        (
            "mlp:64-16-10",
            np.zeros((6, 64), np.float32),
            np.arange(6, dtype=np.int64) * 3,
            "its y holds class 15, the model has classes 0..9",
        ),
        (
            "scored_task_module:task",
            np.zeros((6, FEATURES + 2), np.float32),
            np.zeros(6, np.int64),
            "its loss fails on one example of x [7] float32 and y [] int",
        ),
    ],
    ids=["builtin-features", "builtin-labels", "custom"],
)
def test_a_test_set_the_task_cannot_evaluate_is_refused_before_the_run(
    tmp_path, monkeypatch, task, x, y, problem
):
    """Not at the first round's close, after the nodes have trained: at start, one line."""
    (tmp_path / "scored_task_module.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "test.npz"
    Dataset(x, y).save(path)
    config = AggregatorSettings(federation="fed", task=task, nodes=1, rounds=2,
                                test_data=str(path))  # fmt: skip
    with pytest.raises(ValueError) as error:
        build_aggregator(config, lambda *_: None)
    text = str(error.value)
    assert text.startswith(f"--test-data {path}: cannot evaluate task ")
    assert problem in text
    assert "\n" not in text
