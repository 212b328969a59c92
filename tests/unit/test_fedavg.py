"""FedAvg maths as plain functions: the streaming weighted sum against a float64 reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator.fedavg import MAX_WEIGHT, WeightedSum, apply_mean_delta, fedavg
from fedmq.models import get_model

LAYOUT = {"l0.w": (6, 4), "l0.b": (4,), "l1.w": (4, 3), "l1.b": (3,)}


def random_params(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        name: (scale * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in LAYOUT.items()
    }


def reference_mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """The example-weighted mean written out in float64, independently of WeightedSum."""
    total = sum(weight for _, weight in updates)
    return {
        name: np.sum([weight * delta[name].astype(np.float64) for delta, weight in updates], axis=0)
        / total
        for name in LAYOUT
    }


def test_weighted_sum_mean_equals_float64_reference() -> None:
    rng = np.random.default_rng(1)
    updates = [(random_params(rng, 0.01), int(rng.integers(1, 500))) for _ in range(7)]
    running = WeightedSum(LAYOUT)
    for delta, weight in updates:
        running.add(delta, weight)

    mean = running.mean()
    expected = reference_mean(updates)
    assert running.count == 7
    assert running.total_weight == sum(w for _, w in updates)
    for name in LAYOUT:
        assert mean[name].dtype == np.float64
        # Each n_i * delta_i is rounded once to float32 before the float64 sum (by design,
        # so the result is deterministic per update): float32-level agreement, no better.
        np.testing.assert_allclose(mean[name], expected[name], rtol=1e-6, atol=1e-12)


def test_fedavg_equals_reference_and_keeps_float32() -> None:
    rng = np.random.default_rng(2)
    global_params = random_params(rng)
    updates = [(random_params(rng, 0.05), int(rng.integers(1, 1000))) for _ in range(5)]

    result = fedavg(global_params, updates)
    mean = reference_mean(updates)
    for name, array in global_params.items():
        assert result[name].dtype == np.float32
        assert result[name].shape == array.shape
        expected = (array.astype(np.float64) + mean[name]).astype(np.float32)
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)


def test_fedavg_on_the_real_model_layout_keeps_dtype_and_shapes() -> None:
    model = get_model("digits-mlp")
    global_params = model.init(0)
    rng = np.random.default_rng(3)
    delta = {
        name: rng.standard_normal(a.shape).astype(np.float32) for name, a in global_params.items()
    }
    result = fedavg(global_params, [(delta, 10)])
    for name, array in global_params.items():
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], array + delta[name], rtol=1e-6, atol=1e-7)


def test_weights_matter_three_times_the_examples_pulls_three_times() -> None:
    zeros = {name: np.zeros(shape, np.float32) for name, shape in LAYOUT.items()}
    ones = {name: np.ones(shape, np.float32) for name, shape in LAYOUT.items()}
    # Node A (delta 0) has 100 examples, node B (delta 1) has 300: mean = 300 / 400.
    result = fedavg(zeros, [(zeros, 100), (ones, 300)])
    for name in LAYOUT:
        np.testing.assert_array_equal(result[name], np.full(LAYOUT[name], 0.75, np.float32))
    # Equal weights would give 0.5; swapping the weights gives 0.25.
    swapped = fedavg(zeros, [(zeros, 300), (ones, 100)])
    for name in LAYOUT:
        np.testing.assert_array_equal(swapped[name], np.full(LAYOUT[name], 0.25, np.float32))


def test_apply_mean_delta_casts_back_to_the_globals_dtype() -> None:
    global_params = {"w": np.array([1.0, 2.0], np.float32)}
    result = apply_mean_delta(global_params, {"w": np.array([0.5, -0.25], np.float64)})
    assert result["w"].dtype == np.float32
    np.testing.assert_array_equal(result["w"], np.array([1.5, 1.75], np.float32))


def test_mean_without_updates_raises() -> None:
    with pytest.raises(ValueError, match="no update"):
        WeightedSum(LAYOUT).mean()
    with pytest.raises(ValueError, match="no update"):
        fedavg({name: np.zeros(s, np.float32) for name, s in LAYOUT.items()}, [])


@pytest.mark.parametrize("weight", [0, -3, MAX_WEIGHT + 1])
def test_weight_out_of_range_is_rejected(weight: int) -> None:
    running = WeightedSum(LAYOUT)
    with pytest.raises(ValueError, match="weight must be"):
        running.add(random_params(np.random.default_rng(0)), weight)
    assert running.count == 0
    assert running.total_weight == 0
    assert all(not total.any() for total in running.sums.values())


def test_the_largest_weight_is_exact() -> None:
    ones = {name: np.ones(shape, np.float32) for name, shape in LAYOUT.items()}
    running = WeightedSum(LAYOUT)
    running.add(ones, MAX_WEIGHT)
    running.add(ones, 1)
    for total in running.sums.values():
        np.testing.assert_array_equal(total, float(MAX_WEIGHT + 1))


def test_a_delta_with_the_wrong_shape_is_not_added() -> None:
    running = WeightedSum({"w": (6, 4)})
    with pytest.raises(ValueError):
        running.add({"w": np.ones((4, 6), np.float32)}, 1)
    assert running.count == 0


def _arrays_held(obj: object) -> list[np.ndarray]:
    """Every ndarray reachable from an object's attributes through dicts, lists and tuples,
    a view counted as the array that owns its memory (each once)."""
    found: list[np.ndarray] = []
    stack: list[object] = list(vars(obj).values())
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            while isinstance(item.base, np.ndarray):
                item = item.base
            if all(item is not seen for seen in found):
                found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return found


def test_memory_is_o_model_whatever_the_number_of_updates() -> None:
    # Big enough that any fixed-size work area is small next to the model, and 50 updates'
    # worth (50 x 4 bytes x elements) dwarfs a couple of float64 model-sized buffers.
    layout = {"w": (300, 400), "b": (400,)}
    model_elements = 300 * 400 + 400
    rng = np.random.default_rng(4)

    def update() -> dict[str, np.ndarray]:
        return {name: rng.standard_normal(shape, np.float32) for name, shape in layout.items()}

    running = WeightedSum(layout)
    running.add(update(), 5)
    bytes_after_one = sum(a.nbytes for a in _arrays_held(running))

    added = [update() for _ in range(49)]
    for delta in added:
        running.add(delta, 7)
    held = _arrays_held(running)
    bytes_after_fifty = sum(a.nbytes for a in held)

    assert running.count == 50
    assert bytes_after_fifty == bytes_after_one
    assert {name: a.shape for name, a in running.sums.items()} == layout
    assert all(a.dtype == np.float64 for a in running.sums.values())
    # The float64 sum plus at most one model-sized work area: about 1.9 MB, where keeping
    # the updates would hold 50 x 0.48 MB.
    assert bytes_after_fifty <= 2 * 8 * model_elements
    assert all(a.size <= model_elements for a in held)
    # No update is kept alive by reference either.
    for delta in added:
        for array in held:
            for tensor in delta.values():
                assert not np.shares_memory(array, tensor)


@st.composite
def rounds_of_updates(draw: st.DrawFn) -> tuple[list[tuple[dict[str, np.ndarray], int]], list[int]]:
    count = draw(st.integers(min_value=2, max_value=8))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    scales = draw(
        st.lists(st.sampled_from([1e-4, 1e-2, 1.0, 100.0]), min_size=count, max_size=count)
    )
    weights = draw(
        st.lists(st.integers(min_value=1, max_value=10_000), min_size=count, max_size=count)
    )
    updates = [
        (random_params(rng, scale), weight) for scale, weight in zip(scales, weights, strict=True)
    ]
    order = draw(st.permutations(range(count)))
    return updates, list(order)


# How often is it bitwise equal? Replaying this strategy with numpy for 2,000 draws, plus
# 4,000 harsher ones (up to 50 updates, weights up to 10**6, delta scales 1e-6 to 1e3,
# globals near 1 or near 1e-8), the permuted result was bitwise equal to the original order
# in every draw (6,000 / 6,000), both for the original float64-product WeightedSum and for
# the chunked float32-product one (commit e046dd3). Expected rather than guaranteed: each
# n_i * delta_i is rounded deterministically per update, and the float64 additions only
# round differently by ~2**-53 relative, which rarely survives the final cast to float32.
# So only closeness is asserted.
@settings(max_examples=150, deadline=None)
@given(rounds_of_updates())
def test_result_is_independent_of_update_order(
    case: tuple[list[tuple[dict[str, np.ndarray], int]], list[int]],
) -> None:
    updates, order = case
    rng = np.random.default_rng(0)
    global_params = random_params(rng)
    forward = fedavg(global_params, updates)
    permuted = fedavg(global_params, [updates[i] for i in order])
    for name in LAYOUT:
        assert permuted[name].dtype == np.float32
        np.testing.assert_allclose(permuted[name], forward[name], rtol=1e-6, atol=1e-7)
