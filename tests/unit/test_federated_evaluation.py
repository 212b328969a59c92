"""Federated evaluation (issue 13): the node's hold-out split, the wire fields
(plan.eval_fraction, update.metrics/eval_examples, metrics.metrics), the aggregator's
example-weighted federated metrics, --eval-fraction and the fingerprint, report.json."""

import argparse
import dataclasses
import math

import msgpack
import numpy as np
import pytest

from fedmq.aggregator.federated_metrics import federated_metrics
from fedmq.aggregator.robust import parse_rule
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.settings import (
    AUTO_EVAL_FRACTION,
    AggregatorSettings,
    eval_fraction_of,
    fingerprint_mismatch,
    run_fingerprint,
)
from fedmq.datasets import Dataset
from fedmq.report import build_report, summary_lines
from fedmq.schemas import (
    NodeUpdate,
    RoundEvaluation,
    RoundMetrics,
    SchemaError,
    TrainingPlan,
    decode_metrics,
    decode_update,
    encode,
)
from fedmq.schemas.messages import (
    MAX_EVAL_FRACTION,
    MAX_LOSS,
    MAX_METRICS,
    PLAN,
    finite_metrics,
)
from fedmq.settings import MAX_EVAL_FRACTION as SETTINGS_MAX_EVAL_FRACTION
from fedmq.settings import eval_fraction
from fedmq.tasks.holdout import MAX_EVAL_FRACTION as HOLDOUT_MAX_EVAL_FRACTION
from fedmq.tasks.holdout import held_out_count, holdout
from tests.unit.test_aggregator_server import MODEL, Harness

# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("n", [2, 3, 10, 119, 1000])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.2, 0.5])
def test_the_split_is_a_partition_of_the_examples(n, fraction):
    train, held = holdout(n, fraction, seed=3, node_id="node-01")
    assert train.dtype == held.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)  # sorted, no repeats
    assert sorted([*train.tolist(), *held.tolist()]) == list(range(n))
    assert len(held) == max(1, math.floor(fraction * n)) <= len(train)


def test_the_split_is_the_same_every_time_and_differs_by_node_and_seed():
    first = holdout(500, 0.2, seed=0, node_id="node-01")
    again = holdout(500, 0.2, seed=0, node_id="node-01")  # another round: same split
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other_node = holdout(500, 0.2, seed=0, node_id="node-02")[1]
    other_seed = holdout(500, 0.2, seed=1, node_id="node-01")[1]
    assert not np.array_equal(first[1], other_node)
    assert not np.array_equal(first[1], other_seed)


def test_the_split_is_pinned():
    """The node's held-out examples are part of a run's result: a change shows here."""
    assert holdout(10, 0.2, seed=0, node_id="node-01")[1].tolist() == [0, 4]


def test_nothing_is_held_out_at_fraction_0_or_from_a_single_example():
    for n, fraction in [(0, 0.2), (1, 0.5), (1, 0.2), (100, 0.0), (0, 0.0)]:
        train, held = holdout(n, fraction, seed=0, node_id="a")
        assert held.size == 0 and train.tolist() == list(range(n))
    assert held_out_count(2, 0.01) == 1  # at least one once there are two


@pytest.mark.parametrize("fraction", [-0.1, 0.51, 1.0, math.nan])
def test_the_split_refuses_a_fraction_outside_0_to_half(fraction):
    with pytest.raises(ValueError, match="eval fraction"):
        holdout(10, fraction, seed=0, node_id="a")


def test_the_three_limits_agree():
    assert MAX_EVAL_FRACTION == HOLDOUT_MAX_EVAL_FRACTION == SETTINGS_MAX_EVAL_FRACTION == 0.5


# --------------------------------------------------------------------------- the wire

BASE_PLAN = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)


def test_the_plan_writes_eval_fraction_only_when_not_0():
    assert "eval_fraction" not in PLAN.to_wire(BASE_PLAN)
    assert PLAN.to_wire(dataclasses.replace(BASE_PLAN, eval_fraction=0.0)) == PLAN.to_wire(
        BASE_PLAN
    )
    wire = PLAN.to_wire(dataclasses.replace(BASE_PLAN, eval_fraction=0.25))
    assert list(wire)[-1] == "eval_fraction" and wire["eval_fraction"] == 0.25
    assert TrainingPlan(**PLAN.decode(wire)).eval_fraction == 0.25
    assert TrainingPlan(**PLAN.decode(PLAN.to_wire(BASE_PLAN))).eval_fraction == 0.0


@pytest.mark.parametrize("bad", [None, -0.01, 0.51, math.inf, math.nan, "0.2", True])
def test_the_plan_rejects_a_bad_eval_fraction(bad):
    wire = PLAN.to_wire(BASE_PLAN) | {"eval_fraction": bad}
    with pytest.raises(SchemaError) as error:
        PLAN.decode(wire)
    assert error.value.reason in ("bad_field", "non_finite")
    assert "eval_fraction" in str(error.value)


def update(**fields) -> NodeUpdate:
    delta = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    values = {
        "federation": "f", "node_id": "node-01", "round": 1, "base_model_id": "0" * 32,
        "num_examples": 80, "train_loss": 0.5, "train_seconds": 0.1, "delta": delta,
    }  # fmt: skip
    return NodeUpdate(**(values | fields))


def test_an_update_without_metrics_is_byte_for_byte_as_before():
    wire = msgpack.unpackb(encode(update()), raw=False)
    assert "metrics" not in wire and "eval_examples" not in wire
    decoded = decode_update(encode(update()))
    assert decoded.metrics is None and decoded.eval_examples is None


def test_an_update_carries_its_metrics_before_the_delta():
    payload = encode(update(metrics={"loss": 0.25, "accuracy": 1}, eval_examples=20))
    wire = msgpack.unpackb(payload, raw=False)
    assert list(wire)[-3:] == ["metrics", "eval_examples", "delta"]
    assert type(wire["metrics"]["accuracy"]) is float  # written as float64
    decoded = decode_update(payload)
    assert decoded.metrics == {"loss": 0.25, "accuracy": 1.0}
    assert decoded.eval_examples == 20


def raw_update(**changes) -> bytes:
    wire = msgpack.unpackb(encode(update()), raw=False)
    return msgpack.packb(wire | changes, use_bin_type=True)


@pytest.mark.parametrize(
    ("changes", "reason", "named"),
    [
        ({"metrics": {"loss": 0.1}}, "bad_field", "together"),
        ({"eval_examples": 5}, "bad_field", "together"),
        ({"metrics": {}, "eval_examples": 5}, "bad_field", "metrics"),
        ({"metrics": [0.1], "eval_examples": 5}, "bad_field", "metrics"),
        ({"metrics": {"lo ss": 0.1}, "eval_examples": 5}, "bad_field", "metric names"),
        ({"metrics": {"x" * 65: 0.1}, "eval_examples": 5}, "bad_field", "metric names"),
        ({"metrics": {"loss": "0.1"}, "eval_examples": 5}, "bad_field", "loss"),
        ({"metrics": {"loss": None}, "eval_examples": 5}, "bad_field", "loss"),
        ({"metrics": {"loss": math.nan}, "eval_examples": 5}, "non_finite", "loss"),
        ({"metrics": {"loss": -math.inf}, "eval_examples": 5}, "non_finite", "loss"),
        (
            {"metrics": {f"m{i}": 0.0 for i in range(MAX_METRICS + 1)}, "eval_examples": 5},
            "bad_field",
            "metrics",
        ),
        ({"metrics": {"loss": 0.1}, "eval_examples": 0}, "bad_field", "eval_examples"),
        ({"metrics": {"loss": 0.1}, "eval_examples": -1}, "bad_field", "eval_examples"),
        ({"metrics": {"loss": 0.1}, "eval_examples": 2.0}, "bad_field", "eval_examples"),
        ({"metrics": {"loss": 0.1}, "eval_examples": 81}, "bad_field", "eval_examples 81"),
    ],
)
def test_malformed_metrics_of_an_update_are_rejected(changes, reason, named):
    with pytest.raises(SchemaError) as error:
        decode_update(raw_update(**changes))
    assert error.value.reason == reason
    assert named in str(error.value)


def test_an_update_with_nil_metrics_and_eval_examples_reads_as_none():
    decoded = decode_update(raw_update(metrics=None, eval_examples=None))
    assert decoded.metrics is None and decoded.eval_examples is None


def test_metric_values_beyond_the_loss_limit_are_saturated_not_rejected():
    payload = raw_update(metrics={"loss": 1e300, "bias": -1e300}, eval_examples=80)
    assert decode_update(payload).metrics == {"loss": MAX_LOSS, "bias": -MAX_LOSS}


def round_metrics(**fields) -> RoundMetrics:
    values = {
        "federation": "f", "round": 2, "model_id": "a" * 32, "participants": ["node-01"],
        "num_examples": 80, "accuracy": 0.5, "loss": 1.5, "train_loss": 1.25,
        "uplink_bytes": 1, "downlink_bytes": 1, "global_bytes": 1, "rejected": {},
        "seconds": 1.0, "aggregate_seconds": 0.1, "closed_by": "all_reported",
    }  # fmt: skip
    return RoundMetrics(**(values | fields))


def test_round_metrics_carry_central_and_federated_parts():
    parts = RoundEvaluation(central={"accuracy": 0.5, "loss": 1.5}, federated={"loss": 2.0})
    payload = encode(round_metrics(metrics=parts))
    wire = msgpack.unpackb(payload, raw=False)
    assert list(wire)[-1] == "metrics"
    assert wire["metrics"] == {
        "central": {"accuracy": 0.5, "loss": 1.5},
        "federated": {"loss": 2.0},
    }
    assert decode_metrics(payload).metrics == parts
    nil = RoundEvaluation(central={"accuracy": 0.5}, federated=None)
    assert msgpack.unpackb(encode(round_metrics(metrics=nil)), raw=False)["metrics"] == {
        "central": {"accuracy": 0.5},
        "federated": None,
    }
    assert decode_metrics(encode(round_metrics(metrics=nil))).metrics == nil


def test_round_metrics_of_an_older_aggregator_have_no_parts():
    payload = encode(round_metrics())
    assert "metrics" not in msgpack.unpackb(payload, raw=False)
    decoded = decode_metrics(payload)
    assert decoded.metrics is None and "metrics" not in decoded.extra


@pytest.mark.parametrize(
    "bad",
    [
        [1.0],
        {"central": {"loss": math.nan}},
        {"federated": {}},
        {"federated": {"bad name": 1.0}},
        {"central": "accuracy"},
    ],
)
def test_malformed_round_metrics_parts_are_rejected(bad):
    wire = msgpack.unpackb(encode(round_metrics()), raw=False) | {"metrics": bad}
    with pytest.raises(SchemaError) as error:
        decode_metrics(msgpack.packb(wire, use_bin_type=True))
    assert error.value.reason in ("bad_field", "non_finite")


def test_missing_parts_read_as_nil():
    wire = msgpack.unpackb(encode(round_metrics()), raw=False) | {"metrics": {}}
    assert decode_metrics(msgpack.packb(wire)).metrics == RoundEvaluation(None, None)


# --------------------------------------------------------------------------- the maths


def test_federated_metrics_are_weighted_by_eval_examples_in_node_order():
    updates = {
        "b": update(node_id="b", metrics={"loss": 1.0, "accuracy": 0.5}, eval_examples=30),
        "a": update(node_id="a", metrics={"loss": 3.0, "accuracy": 1.0}, eval_examples=10),
        "c": update(node_id="c"),  # no metrics: does not count
    }
    assert federated_metrics(updates) == {
        "accuracy": (0.5 * 30 + 1.0 * 10) / 40,
        "loss": (1.0 * 30 + 3.0 * 10) / 40,
    }
    reordered = dict(reversed(list(updates.items())))
    assert federated_metrics(reordered) == federated_metrics(updates)


def test_a_metric_only_some_nodes_report_is_averaged_over_those():
    updates = {
        "a": update(node_id="a", metrics={"loss": 1.0, "auc": 0.5}, eval_examples=10),
        "b": update(node_id="b", metrics={"loss": 2.0}, eval_examples=30),
    }
    assert federated_metrics(updates) == {"auc": 0.5, "loss": (10 + 60) / 40}


def test_no_metrics_no_federated_metrics():
    assert federated_metrics({}) is None
    assert federated_metrics({"a": update(node_id="a")}) is None


def test_finite_metrics_leave_out_nan_and_none():
    assert finite_metrics({"accuracy": np.float64(0.5), "loss": math.nan}) == {"accuracy": 0.5}
    assert type(finite_metrics({"accuracy": np.float64(0.5)})["accuracy"]) is float
    assert finite_metrics({"accuracy": None, "loss": math.inf}) is None


# --------------------------------------------------------------------------- the aggregator


def test_a_round_reports_federated_metrics_of_its_updates_and_central_of_its_model():
    rng = np.random.default_rng(0)
    test = Dataset(rng.uniform(size=(40, 64)).astype(np.float32), rng.integers(0, 10, 40))
    h = Harness(policy=RoundPolicy(expected_nodes=3, min_nodes=3), test=test)
    h.agg.start()
    h.report("pi-b", metrics={"loss": 2.0, "accuracy": 0.25}, eval_examples=3)
    h.report("pi-a", metrics={"loss": 1.0, "accuracy": 0.75}, eval_examples=1)
    h.report("pi-c", seed=1)  # no metrics
    (metrics,) = h.metrics()
    assert metrics.metrics == RoundEvaluation(
        central={"accuracy": metrics.accuracy, "loss": metrics.loss},
        federated={"accuracy": (0.25 * 3 + 0.75) / 4, "loss": (2.0 * 3 + 1.0) / 4},
    )


def test_clipped_and_capped_updates_count_in_the_federated_metrics():
    h = Harness(
        policy=RoundPolicy(expected_nodes=3, min_nodes=3),
        aggregation=parse_rule("fedavg+clip-median:1+cap-examples:1"),
    )
    h.agg.start()
    big = {name: np.full(shape, 5.0, np.float32) for name, shape in MODEL.layout.items()}
    h.report("pi-a", metrics={"loss": 1.0}, eval_examples=2)
    h.report("pi-b", metrics={"loss": 2.0}, eval_examples=2, seed=1)
    h.report("pi-c", metrics={"loss": 4.0}, eval_examples=4, delta=big, num_examples=1000)
    (metrics,) = h.metrics()
    assert metrics.extra["clipped"] >= 1 and metrics.extra["capped"] == 1
    assert metrics.metrics.federated == {"loss": (2.0 + 4.0 + 16.0) / 8}


def test_without_a_test_set_central_is_nil():
    h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1))
    h.agg.start()
    h.report("pi-a")
    (metrics,) = h.metrics()
    assert metrics.metrics == RoundEvaluation(central=None, federated=None)


def test_the_global_model_announces_the_plans_eval_fraction():
    plan = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)
    h = Harness(plan=dataclasses.replace(plan, eval_fraction=0.2))
    h.agg.start()
    assert h.globals()[0].plan.eval_fraction == 0.2
    assert h.agg.settings.fingerprint["eval_fraction"] == 0.2


# --------------------------------------------------------------------------- settings


def test_eval_fraction_option():
    assert eval_fraction("auto") is None and eval_fraction("AUTO") is None
    assert eval_fraction("0") == 0.0 and eval_fraction("0.5") == 0.5
    for bad in ("0.6", "-0.1", "x", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="or auto"):
            eval_fraction(bad)


def test_auto_means_0_with_a_test_set_and_0_2_without():
    assert eval_fraction_of(None, has_test_set=True) == 0.0
    assert eval_fraction_of(None, has_test_set=False) == AUTO_EVAL_FRACTION == 0.2
    assert eval_fraction_of(0.0, has_test_set=False) == 0.0
    assert eval_fraction_of(0.3, has_test_set=True) == 0.3


def test_eval_fraction_is_in_the_fingerprint_only_when_not_0():
    values = dataclasses.asdict(AggregatorSettings(test_data=None))
    old = run_fingerprint(values | {"eval_fraction": 0.0})
    assert "eval_fraction" not in old  # as a run kept before federated evaluation
    new = run_fingerprint(values | {"eval_fraction": 0.2})
    assert new["eval_fraction"] == 0.2
    assert fingerprint_mismatch(old, old) is None
    assert fingerprint_mismatch(old, new) == ("--eval-fraction", 0.0, 0.2)
    assert fingerprint_mismatch(new, old) == ("--eval-fraction", 0.2, 0.0)
    assert fingerprint_mismatch(new, new) is None


def test_a_run_kept_before_federated_evaluation_resumes(tmp_path):
    """A checkpoint whose fingerprint has no eval_fraction (older fedmq) resumes with a
    test set (auto: 0); a run that evaluates federated is refused naming the option."""
    from fedmq.aggregator.app import build_aggregator, resume_or_start
    from fedmq.aggregator.checkpoint import CheckpointError, StateDir

    first = AggregatorSettings(test_data=None, eval_fraction=0.0)
    store = StateDir(tmp_path)
    build_aggregator(first, lambda *_: None, store).start()
    store.close()
    saved = StateDir(tmp_path).load()
    assert saved is not None and "eval_fraction" not in saved.fingerprint
    store = StateDir(tmp_path)
    assert resume_or_start(build_aggregator(first, lambda *_: None), store)
    store.close()
    auto = build_aggregator(dataclasses.replace(first, eval_fraction=None), lambda *_: None)
    with pytest.raises(CheckpointError, match=r"--eval-fraction 0\.2 does not match"):
        resume_or_start(auto, StateDir(tmp_path))


def test_the_demo_passes_eval_fraction_to_the_aggregator(tmp_path):
    from fedmq.demo import child_argv
    from fedmq.demo_settings import DemoSettings
    from fedmq.mqtt import BrokerAddress

    address = BrokerAddress.parse("127.0.0.1:1883")
    default = child_argv(DemoSettings(), address, tmp_path, tmp_path / "t.npz", [])
    assert "--eval-fraction" not in default["aggregator"]
    chosen = child_argv(DemoSettings(eval_fraction=0.25), address, tmp_path, tmp_path / "t", [])
    argv = chosen["aggregator"]
    assert argv[argv.index("--eval-fraction") + 1] == "0.25"


# --------------------------------------------------------------------------- report.json


def test_report_rows_and_final_metrics():
    parts = RoundEvaluation(central={"accuracy": 0.9, "loss": 0.3}, federated={"loss": 0.4})
    report = build_report([round_metrics(round=1), round_metrics(round=2, metrics=parts)])
    assert report["rounds"][0]["metrics"] == {"central": None, "federated": None}
    assert report["rounds"][1]["metrics"] == {"central": parts.central, "federated": {"loss": 0.4}}
    assert report["final_metrics"] == {"central": parts.central, "federated": {"loss": 0.4}}
    assert report["final_accuracy"] == 0.9


def test_final_accuracy_is_federated_without_a_test_set():
    parts = RoundEvaluation(central=None, federated={"accuracy": 0.8, "loss": 0.4})
    report = build_report([round_metrics(accuracy=None, loss=None, metrics=parts)])
    assert report["final_accuracy"] == 0.8
    no_accuracy = RoundEvaluation(central=None, federated={"loss": 0.4})
    report = build_report([round_metrics(accuracy=None, loss=None, metrics=no_accuracy)])
    assert report["final_accuracy"] is None


def test_a_report_of_an_older_aggregator_keeps_its_accuracy():
    report = build_report([round_metrics(accuracy=0.7)])
    assert report["final_accuracy"] == 0.7
    assert report["final_metrics"] == {"central": None, "federated": None}
    assert build_report([])["final_metrics"] == {"central": None, "federated": None}


def test_the_summary_shows_federated_metrics_when_there_are_any():
    plain = summary_lines(build_report([round_metrics()]))
    assert not any("federated" in line for line in plain)
    rounds = [
        round_metrics(round=r, metrics=RoundEvaluation(None, {"loss": 2.0 / r, "accuracy": r / 4}))
        for r in (1, 2)
    ]
    lines = summary_lines(build_report(rounds))
    assert "federated (rounds 1 to 2): loss 2.0000 -> 1.0000, accuracy 0.2500 -> 0.5000" in lines
