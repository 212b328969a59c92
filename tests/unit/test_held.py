"""The open version's held updates (aggregator.combine.Held): plain FedAvg folds each
update in as it is accepted and keeps no delta, whatever the arrival order gives the
same model; every other rule holds the updates and combines them in key order."""

import dataclasses

import numpy as np
import pytest

from fedmq.aggregator.combine import Held, combine
from fedmq.aggregator.fedavg import apply_mean_delta
from fedmq.aggregator.robust import DEFAULT, FEDAVG, Rule
from fedmq.models import get_model
from fedmq.schemas import NodeUpdate

from .test_aggregator_server import Harness

PARAMS = get_model("digits-mlp").init(0)
LAYOUT = {name: tuple(array.shape) for name, array in PARAMS.items()}


def updates(count: int, seed: int = 0) -> dict[str, NodeUpdate]:
    """Deltas whose magnitudes span ~20 binary orders (float64 sums of them are not exact,
    so their rounding depends on the order), example counts from 1 to 400."""
    rng = np.random.default_rng(seed)
    made = {}
    for i in range(count):
        delta = {
            name: (rng.normal(0, 0.01, shape) * rng.choice([1, 1e-3, 1e-6], size=shape)).astype(
                np.float32
            )
            for name, shape in LAYOUT.items()
        }
        made[f"n{i:04d}"] = NodeUpdate(
            federation="f", node_id=f"n{i:04d}", round=1, base_model_id="m",
            num_examples=int(rng.integers(1, 401)), train_loss=float(rng.uniform(0, 3)),
            train_seconds=0.0, delta=delta,
        )  # fmt: skip
    return made


def held(rule: Rule, given: dict[str, NodeUpdate], order: list[str]) -> Held:
    result = Held(rule, LAYOUT)
    for key in order:
        result.add(key, given[key])
    return result


def test_plain_fedavg_folds_each_update_in_and_keeps_no_delta() -> None:
    given = updates(5)
    folded = held(FEDAVG, given, sorted(given))
    assert sorted(folded) == sorted(given)
    for key, update in folded.items():  # every field but the delta kept, as a NodeUpdate
        assert type(update) is NodeUpdate
        assert update == dataclasses.replace(given[key], delta={})
    expected = combine(FEDAVG, given, LAYOUT)  # holding them all, summed in key order
    combined = folded.combine()
    assert combined.train_loss == expected.train_loss
    for name in LAYOUT:
        assert np.array_equal(combined.delta[name], expected.delta[name])


def test_the_arrival_order_does_not_change_the_model() -> None:
    """The float64 sums differ between orders in most elements (the summands' exponents
    span too much for them to be exact), the float32 model in none (Held's docstring)."""
    given = updates(300, seed=1)
    keys = sorted(given)
    reference = held(FEDAVG, given, keys).combine()
    model = apply_mean_delta(PARAMS, reference.delta)
    rng = np.random.default_rng(2)
    sums_differ = 0
    for _ in range(5):
        shuffled = held(FEDAVG, given, list(rng.permutation(keys)))
        combined = shuffled.combine()
        sums_differ += sum(int((combined.delta[n] != reference.delta[n]).sum()) for n in LAYOUT)
        assert combined.train_loss == reference.train_loss  # summed in key order
        other = apply_mean_delta(PARAMS, combined.delta)
        for name in LAYOUT:
            assert np.array_equal(other[name], model[name]), name
    assert sums_differ > 0  # the test would prove nothing if every sum were exact


def test_a_scale_given_at_acceptance_weighs_the_delta_as_at_the_close() -> None:
    given = updates(3)
    scales = {"n0000": 1.0, "n0001": 0.5, "n0002": 0.25}
    for rule in (FEDAVG, DEFAULT):
        result = Held(rule, LAYOUT)
        for key in sorted(given):
            result.add(key, given[key], scales[key])
        expected = combine(rule, given, LAYOUT, scales)
        for name in LAYOUT:
            assert np.array_equal(result.combine().delta[name], expected.delta[name])


@pytest.mark.parametrize("rule", [DEFAULT, Rule("median"), Rule("trimmed-mean", trim=0.2)])
def test_other_rules_hold_whole_updates_and_combine_them_in_key_order(rule: Rule) -> None:
    given = updates(7)
    order = list(np.random.default_rng(3).permutation(sorted(given)))
    result = held(rule, given, order)
    assert all(result[key] is given[key] for key in given)
    expected = combine(rule, given, LAYOUT)
    assert result.combine().extra == expected.extra
    for name in LAYOUT:
        assert np.array_equal(result.combine().delta[name], expected.delta[name])


def test_a_key_is_held_once() -> None:
    given = updates(1)
    result = held(FEDAVG, given, ["n0000"])
    with pytest.raises(ValueError, match="already held"):
        result.add("n0000", given["n0000"])


def test_the_aggregator_keeps_no_delta_under_plain_fedavg() -> None:
    harness = Harness()
    harness.agg.start()
    payload, _ = harness.update("pi-01")
    harness.send("pi-01", payload)
    [kept] = harness.agg.held.values()
    assert kept.node_id == "pi-01" and kept.delta == {}
