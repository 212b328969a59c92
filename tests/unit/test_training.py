"""Local training of the built-in MLPs through the tasks path (``fedmq.tasks.training``):
the seeded epoch order, one epoch against a numpy reference, the data checks, and the
delta. ``sgd_reference`` is the node's training before tasks (node/training.py, frozen
here), which the tasks path must equal bit for bit (tests/unit/test_tasks.py)."""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmq.models import MLP, cross_entropy_and_accuracy, get_model
from fedmq.schemas.messages import TrainingPlan
from fedmq.tasks.builtin import mlp_params, mlp_task
from fedmq.tasks.naming import flatten_params
from fedmq.tasks.seeds import epoch_order, seed_key
from fedmq.tasks.training import data_problem, delta, train_local

MODEL = get_model("digits-mlp")  # 64 -> 32 ReLU -> 10
TASK = mlp_task("digits-mlp")
TEMPLATE = jax.eval_shape(TASK.init, seed_key(0))
ORDER_ARGS = {"seed": 7, "node_id": "pi-1", "round_number": 3, "epoch": 0}


def train(
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    learning_rate: float,
    batch_size: int,
    local_epochs: int,
    seed: int,
    node_id: str,
    round: int,
) -> tuple[dict[str, np.ndarray], float]:
    """What the node does with the built-in task: named tensors in and out."""
    plan = TrainingPlan(learning_rate, batch_size, local_epochs, seed)
    trained, loss = train_local(
        TASK, mlp_params(MODEL, params), x, y, plan, node_id=node_id, round_number=round
    )
    return flatten_params(trained), loss


# ------------------------------------------------------------- the node before tasks, frozen


def sgd_epoch(model: MLP, batch_size: int) -> Callable[..., tuple[Any, jax.Array]]:
    """node/training.py's ``make_epoch_fn`` as it was: one jitted epoch of plain SGD."""

    def batch_loss(params: Any, xb: jax.Array, yb: jax.Array, mb: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(model.logits(params, xb, jnp))
        nll = -jnp.take_along_axis(log_probs, yb[:, None], axis=1)[:, 0]
        return jnp.sum(nll * mb) / jnp.maximum(jnp.sum(mb), 1.0)

    def sgd_step(params: Any, batch: Any, learning_rate: jax.Array) -> tuple[Any, jax.Array]:
        xb, yb, mb = batch
        loss, grads = jax.value_and_grad(batch_loss)(params, xb, yb, mb)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return params, loss * jnp.sum(mb)

    @jax.jit
    def epoch(params: Any, x: Any, y: Any, order: Any, mask: Any, learning_rate: Any) -> Any:
        batches = (
            x[order].reshape(-1, batch_size, x.shape[1]),
            y[order].reshape(-1, batch_size),
            mask.reshape(-1, batch_size),
        )
        params, weighted = jax.lax.scan(
            partial(sgd_step, learning_rate=learning_rate), params, batches
        )
        return params, jnp.sum(weighted) / jnp.sum(mask)

    return epoch


def sgd_reference(
    model: MLP, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, plan: TrainingPlan,
    *, node_id: str, round_number: int,
) -> tuple[dict[str, np.ndarray], float]:  # fmt: skip
    """node/training.py's ``LocalTrainer.train`` as it was (the reference demo's numbers)."""
    epoch = sgd_epoch(model, plan.batch_size)
    current, loss = dict(params), np.float32(np.nan)
    xd, yd = jnp.asarray(x, dtype=jnp.float32), jnp.asarray(y, dtype=jnp.int32)
    for index in range(plan.local_epochs):
        order, mask = epoch_order(
            len(y), plan.batch_size, seed=plan.seed, node_id=node_id,
            round_number=round_number, epoch=index,
        )  # fmt: skip
        current, loss = epoch(current, xd, yd, order, mask, np.float32(plan.learning_rate))
    return {name: np.asarray(array) for name, array in current.items()}, float(loss)


# --------------------------------------------------------------------------- epoch_order


def test_epoch_order_is_deterministic() -> None:
    first = epoch_order(37, 16, **ORDER_ARGS)
    second = epoch_order(37, 16, **ORDER_ARGS)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


@pytest.mark.parametrize(
    "change", [{"round_number": 4}, {"node_id": "pi-2"}, {"epoch": 1}, {"seed": 8}]
)
def test_epoch_order_differs_across_rounds_nodes_epochs_and_seeds(change: dict) -> None:
    base, _ = epoch_order(200, 16, **ORDER_ARGS)
    other, _ = epoch_order(200, 16, **(ORDER_ARGS | change))
    assert not np.array_equal(base, other)
    # Same examples, another order.
    np.testing.assert_array_equal(np.sort(base[:200]), np.sort(other[:200]))


@pytest.mark.parametrize(("num_examples", "batch_size"), [(37, 16), (32, 16), (1, 16), (5, 1)])
def test_epoch_order_pads_to_whole_batches_with_an_exact_mask(
    num_examples: int, batch_size: int
) -> None:
    order, mask = epoch_order(num_examples, batch_size, **ORDER_ARGS)
    padded = -(-num_examples // batch_size) * batch_size
    assert order.shape == mask.shape == (padded,)
    assert len(order) % batch_size == 0
    assert mask.dtype == np.float32
    assert mask.sum() == num_examples
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask[:num_examples], 1.0)
    np.testing.assert_array_equal(mask[num_examples:], 0.0)
    # The real part is a permutation of all examples; padding still indexes valid rows.
    np.testing.assert_array_equal(np.sort(order[:num_examples]), np.arange(num_examples))
    assert order.min() >= 0
    assert order.max() < num_examples


def test_epoch_order_for_37_examples_has_three_batches_and_a_partial_one() -> None:
    _, mask = epoch_order(37, 16, **ORDER_ARGS)
    assert mask.reshape(-1, 16).sum(axis=1).tolist() == [16.0, 16.0, 5.0]


# --------------------------------------------------------------------------- one SGD epoch


def reference_epoch(
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    mask: np.ndarray,
    batch_size: int,
    learning_rate: float,
) -> tuple[dict[str, np.ndarray], float]:
    """Plain SGD over the 64 -> 32 ReLU -> 10 MLP, by hand, in float64.

    Each batch: softmax cross-entropy averaged over its real (mask 1) examples, gradients
    by explicit backprop, ``p -= lr * g``. Returns the new parameters and the mean over
    all real examples of the loss each batch had before its step.
    """
    w0, b0, w1, b1 = (params[k].astype(np.float64) for k in ("l0.w", "l0.b", "l1.w", "l1.b"))
    x64 = x.astype(np.float64)
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        m = mask[start : start + batch_size].astype(np.float64)
        xb, yb = x64[idx], y[idx]
        count = max(m.sum(), 1.0)
        # forward
        h = xb @ w0 + b0
        a = np.maximum(h, 0.0)
        z = a @ w1 + b1
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        nll = -np.log(p[np.arange(len(yb)), yb])
        loss_sum += float(np.sum(nll * m))
        # backward
        onehot = np.eye(z.shape[1])[yb]
        dz = (p - onehot) * m[:, None] / count
        dw1 = a.T @ dz
        db1 = dz.sum(axis=0)
        dh = (dz @ w1.T) * (h > 0)
        dw0 = xb.T @ dh
        db0 = dh.sum(axis=0)
        w0, b0 = w0 - learning_rate * dw0, b0 - learning_rate * db0
        w1, b1 = w1 - learning_rate * dw1, b1 - learning_rate * db1
    new = {"l0.w": w0, "l0.b": b0, "l1.w": w1, "l1.b": b1}
    return new, loss_sum / mask.sum()


def test_one_epoch_matches_a_numpy_reference() -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(0.0, 1.0, size=(37, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=37).astype(np.int32)
    params = MODEL.init(5)
    # Non-zero biases so the bias gradients are exercised from a generic point.
    params["l0.b"] = rng.normal(0.0, 0.1, size=32).astype(np.float32)
    params["l1.b"] = rng.normal(0.0, 0.1, size=10).astype(np.float32)

    new, loss = train(
        params,
        x,
        y,
        learning_rate=0.1,
        batch_size=16,
        local_epochs=1,
        seed=3,
        node_id="pi-7",
        round=2,
    )

    order, mask = epoch_order(37, 16, seed=3, node_id="pi-7", round_number=2, epoch=0)
    expected, expected_loss = reference_epoch(params, x, y, order, mask, 16, 0.1)
    assert set(new) == set(params)
    for name in params:
        assert new[name].dtype == np.float32
        assert new[name].shape == params[name].shape
        # The step moved the parameters well beyond the tolerance.
        assert np.abs(expected[name] - params[name]).max() > 1e-3
        np.testing.assert_allclose(new[name], expected[name], rtol=0, atol=1e-5)
    assert loss == pytest.approx(expected_loss, abs=1e-5)


def test_the_epoch_order_is_what_training_uses() -> None:
    """A different order (another round) gives different parameters from the same start."""
    rng = np.random.default_rng(12)
    x = rng.uniform(0.0, 1.0, size=(37, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=37).astype(np.int32)
    params = MODEL.init(1)
    common = {"learning_rate": 0.1, "batch_size": 16, "local_epochs": 1, "seed": 3}
    a, _ = train(params, x, y, node_id="pi-7", round=2, **common)
    again, _ = train(params, x, y, node_id="pi-7", round=2, **common)
    b, _ = train(params, x, y, node_id="pi-7", round=3, **common)
    for name in params:
        np.testing.assert_array_equal(a[name], again[name])
    assert any(not np.allclose(a[name], b[name], atol=1e-7) for name in params)


def learnable_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten well-separated class prototypes in [0, 1]^64 plus a little noise."""
    prototypes = rng.uniform(0.0, 1.0, size=(10, 64))
    y = rng.integers(0, 10, size=n).astype(np.int32)
    x = np.clip(prototypes[y] + rng.normal(0.0, 0.1, size=(n, 64)), 0.0, 1.0)
    return x.astype(np.float32), y


def test_loss_decreases_over_epochs_on_learnable_data() -> None:
    rng = np.random.default_rng(13)
    x, y = learnable_data(rng, 120)
    params = MODEL.init(0)
    start_loss, start_accuracy = cross_entropy_and_accuracy(MODEL.logits(params, x), y)
    reported = []
    for epoch in range(8):
        params, loss = train(
            params,
            x,
            y,
            learning_rate=0.1,
            batch_size=16,
            local_epochs=1,
            seed=0,
            node_id="pi-1",
            round=epoch + 1,
        )
        reported.append(loss)
    end_loss, end_accuracy = cross_entropy_and_accuracy(MODEL.logits(params, x), y)

    assert reported[-1] < reported[0]
    assert reported[-1] < 0.5 * reported[0]
    assert end_loss < 0.5 * start_loss
    assert end_accuracy > max(start_accuracy, 0.8)


def test_several_local_epochs_report_the_last_epochs_loss() -> None:
    rng = np.random.default_rng(14)
    x, y = learnable_data(rng, 64)
    params = MODEL.init(0)
    common = {"learning_rate": 0.1, "batch_size": 16, "seed": 0, "node_id": "n", "round": 1}
    after_one, first_loss = train(params, x, y, local_epochs=1, **common)
    after_three, third_loss = train(params, x, y, local_epochs=3, **common)
    assert third_loss < first_loss
    assert any(not np.allclose(after_one[k], after_three[k]) for k in params)


# --------------------------------------------------------------------------- delta and checks


def test_delta_is_new_minus_base_in_float32() -> None:
    rng = np.random.default_rng(15)
    base = MODEL.init(0)
    new = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in base.items()}
    result = delta(new, base)
    assert list(result) == list(base)
    for name in base:
        assert result[name].dtype == np.float32
        np.testing.assert_array_equal(result[name], new[name] - base[name])
        # Applying it back recovers the trained parameters to float32 precision.
        np.testing.assert_allclose(base[name] + result[name], new[name], rtol=0, atol=1e-6)


def test_delta_of_float64_inputs_is_still_float32() -> None:
    base = {"w": np.array([1.0, 2.0], np.float64)}
    new = {"w": np.array([1.5, 1.0], np.float64)}
    result = delta(new, base)
    assert result["w"].dtype == np.float32
    np.testing.assert_array_equal(result["w"], np.array([0.5, -1.0], np.float32))


def test_the_data_check_names_the_wrong_number_of_features() -> None:
    x = np.zeros((10, 63), np.float32)
    y = np.zeros(10, np.int32)
    assert data_problem(TASK, TEMPLATE, x, y) == "data has 63 features, the model expects 64"


def test_the_data_check_names_a_wrong_shape_of_x() -> None:
    x = np.zeros((10, 8, 8), np.float32)
    assert data_problem(TASK, TEMPLATE, x, np.zeros(10, np.int32)) == (
        "data has shape (8, 8), the model expects 64"
    )


@pytest.mark.parametrize("top_label", [10, 11, 255])
def test_the_data_check_refuses_labels_beyond_the_models_classes(top_label: int) -> None:
    x = np.zeros((10, 64), np.float32)
    y = np.zeros(10, np.int32)
    y[3] = top_label
    assert data_problem(TASK, TEMPLATE, x, y) == (
        f"labels must be class ids 0..9, found 0..{top_label}"
    )


def test_the_data_check_accepts_the_highest_valid_label() -> None:
    x = np.zeros((10, 64), np.float32)
    y = np.full(10, 9, np.int32)
    assert data_problem(TASK, TEMPLATE, x, y) is None


def test_the_data_check_refuses_negative_labels() -> None:
    """JAX's take_along_axis would wrap -1 to the last class (accepted before 4e3ad62)."""
    x = np.zeros((10, 64), np.float32)
    y = np.zeros(10, np.int32)
    y[0] = -1
    assert data_problem(TASK, TEMPLATE, x, y) == "labels must be class ids 0..9, found -1..0"


def test_the_data_check_refuses_float_targets_for_a_classifier() -> None:
    x = np.zeros((10, 64), np.float32)
    y = np.zeros(10, np.float32)
    assert data_problem(TASK, TEMPLATE, x, y) == (
        "labels must be class ids 0..9, found float32 values: store y.astype(int) if they are"
        " whole numbers"
    )


def test_the_data_check_wants_one_class_id_per_example_for_an_mlp() -> None:
    x = np.zeros((10, 64), np.float32)
    y = np.zeros((10, 1), np.int32)
    assert data_problem(TASK, TEMPLATE, x, y) == (
        "labels must be class ids 0..9, one per example (n,), found shape (10, 1): store"
        " y.reshape(-1) if each example has one"
    )


def test_the_data_check_of_any_task_traces_its_loss_on_one_example() -> None:
    """A custom task: its loss is traced once (no compute) and its error is the cause."""
    from fedmq.tasks import Task

    def init(key: Any) -> dict[str, Any]:
        return {"w": jnp.zeros((3, 1), jnp.float32)}

    def loss(params: Any, batch: Any) -> Any:
        x, y = batch
        return jnp.mean((x @ params["w"])[:, 0] - y) ** 2

    import optax

    task = Task(name="lin", init=init, loss=loss, optimizer=optax.sgd(0.1))
    template = jax.eval_shape(task.init, seed_key(0))
    good = np.zeros((5, 3), np.float32), np.zeros(5, np.float32)
    assert data_problem(task, template, *good) is None
    problem = data_problem(task, template, np.zeros((5, 4), np.float32), good[1])
    assert problem is not None and "\n" not in problem
    assert problem.startswith("its loss fails on one example of x [4] float32 and y [] float32: ")
    assert "TypeError" in problem
