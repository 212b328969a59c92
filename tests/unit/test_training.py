"""Local training: the seeded epoch order, one jitted SGD epoch against a numpy reference."""

import numpy as np
import pytest

from fedmq.models import cross_entropy_and_accuracy, get_model
from fedmq.node.training import LocalTrainer, delta, epoch_order

MODEL = get_model("digits-mlp")  # 64 -> 32 ReLU -> 10
ORDER_ARGS = {"seed": 7, "node_id": "pi-1", "round_number": 3, "epoch": 0}


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

    trainer = LocalTrainer(MODEL, x, y)
    new, loss = trainer.train(
        params,
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
    trainer = LocalTrainer(MODEL, x, y)
    common = {"learning_rate": 0.1, "batch_size": 16, "local_epochs": 1, "seed": 3}
    a, _ = trainer.train(params, node_id="pi-7", round=2, **common)
    again, _ = trainer.train(params, node_id="pi-7", round=2, **common)
    b, _ = trainer.train(params, node_id="pi-7", round=3, **common)
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
    trainer = LocalTrainer(MODEL, x, y)
    params = MODEL.init(0)
    start_loss, start_accuracy = cross_entropy_and_accuracy(MODEL.logits(params, x), y)
    reported = []
    for epoch in range(8):
        params, loss = trainer.train(
            params,
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
    trainer = LocalTrainer(MODEL, x, y)
    params = MODEL.init(0)
    common = {"learning_rate": 0.1, "batch_size": 16, "seed": 0, "node_id": "n", "round": 1}
    after_one, first_loss = trainer.train(params, local_epochs=1, **common)
    after_three, third_loss = trainer.train(params, local_epochs=3, **common)
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


def test_trainer_rejects_the_wrong_number_of_features() -> None:
    x = np.zeros((10, 63), np.float32)
    y = np.zeros(10, np.int32)
    with pytest.raises(ValueError, match="63 features"):
        LocalTrainer(MODEL, x, y)


@pytest.mark.parametrize("top_label", [10, 11, 255])
def test_trainer_rejects_labels_beyond_the_models_classes(top_label: int) -> None:
    x = np.zeros((10, 64), np.float32)
    y = np.zeros(10, np.int32)
    y[3] = top_label
    with pytest.raises(ValueError, match="labels"):
        LocalTrainer(MODEL, x, y)


def test_trainer_accepts_the_highest_valid_label() -> None:
    x = np.zeros((10, 64), np.float32)
    y = np.full(10, 9, np.int32)
    assert LocalTrainer(MODEL, x, y).num_examples == 10


def test_trainer_rejects_negative_labels() -> None:
    """JAX's take_along_axis would wrap -1 to the last class (accepted before 4e3ad62)."""
    x = np.zeros((10, 64), np.float32)
    y = np.zeros(10, np.int32)
    y[0] = -1
    with pytest.raises(ValueError, match="labels"):
        LocalTrainer(MODEL, x, y)
