"""The aggregator's round state machine without MQTT: bytes in, publications out, fake clock."""

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator.broker_drops import BrokerDrops
from fedmq.aggregator.evaluate import evaluate
from fedmq.aggregator.fedavg import fedavg
from fedmq.aggregator.policy import VersionPolicy
from fedmq.aggregator.robust import FEDAVG, Rule
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator, RoundSettings, Store, dense_update_bound
from fedmq.compression import parse_spec
from fedmq.datasets import Dataset
from fedmq.models import get_model
from fedmq.schemas import (
    GlobalModel,
    NodeUpdate,
    RoundMetrics,
    Topics,
    TrainingPlan,
    decode_global,
    decode_metrics,
    decode_server_status,
    encode,
    model_id_of,
)
from fedmq.schemas.messages import MAX_EXAMPLES, MAX_LOSS

FEDERATION = "unit-fed"
MODEL = get_model("digits-mlp")
TOPICS = Topics(FEDERATION)
PLAN = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """An Aggregator wired to a list of publications and a clock the test moves."""

    def __init__(
        self,
        *,
        policy: VersionPolicy | None = None,
        rounds: int = 3,
        max_update_bytes: int | None = None,
        test: Dataset | None = None,
        store: Store | None = None,
        plan: TrainingPlan = PLAN,
        aggregation: Rule = FEDAVG,
        known_nodes: frozenset[str] | None = None,
        server_optimizer: str = "fedavg",
        downlink_compression: str | None = None,
        final_downlink_compression: str | None = None,
        init_seed: int | None = None,
        final_delivery_wait: float = 0.0,
    ) -> None:
        self.settings = RoundSettings(
            federation=FEDERATION,
            model_name="digits-mlp",
            model=MODEL,
            rounds=rounds,
            policy=policy or RoundPolicy(expected_nodes=3, min_nodes=3),
            plan=plan,
            max_update_bytes=max_update_bytes or dense_update_bound(MODEL),
            aggregation=aggregation,
            known_nodes=known_nodes,
            server_optimizer=server_optimizer,
            downlink_compression=downlink_compression,
            final_downlink_compression=final_downlink_compression,
            init_seed=init_seed,  # MODEL.init(0) below: 0 is right, others are for tests
            final_delivery_wait=final_delivery_wait,
        )
        self.initial = MODEL.init(0)
        self.clock = FakeClock()
        self.published: list[tuple[str, bytes, bool]] = []
        self.drops = BrokerDrops()  # the broker's $SYS readings, as the MQTT edge feeds them
        self.agg = Aggregator(
            self.settings,
            self.initial,
            publish=lambda topic, payload, retain: self.published.append((topic, payload, retain)),
            test=test,
            clock=self.clock,
            wall_clock=lambda: 1.7e9,
            store=store,
            broker_dropped=self.drops.take,
        )

    # ---------------------------------------------------------------- what went out

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        return [(payload, retain) for t, payload, retain in self.published if t == topic]

    def globals(self) -> list[GlobalModel]:
        return [decode_global(payload) for payload, _ in self.on(TOPICS.global_model)]

    def metrics(self) -> list[RoundMetrics]:
        return [decode_metrics(payload) for payload, _ in self.on(TOPICS.metrics)]

    # ---------------------------------------------------------------- what comes in

    def update(
        self,
        node: str,
        *,
        num_examples: int = 10,
        delta: dict[str, np.ndarray] | None = None,
        seed: int = 0,
        **fields: object,
    ) -> tuple[bytes, dict[str, np.ndarray]]:
        """A valid update against the open round and model, unless ``fields`` say otherwise."""
        if delta is None:
            rng = np.random.default_rng(seed)
            delta = {
                name: rng.normal(0.0, 0.01, shape).astype(np.float32)
                for name, shape in MODEL.layout.items()
            }
        message = NodeUpdate(
            federation=FEDERATION,
            node_id=node,
            round=self.agg.round,
            base_model_id=self.agg.model_id,
            num_examples=num_examples,
            train_loss=1.25,
            train_seconds=0.5,
            delta=delta,
        )
        return encode(replace(message, **fields)), delta

    def send(self, node: str, payload: bytes, *, topic_node: str | None = None) -> None:
        self.agg.handle(TOPICS.update(topic_node or node), payload)

    def report(self, node: str, **kwargs: object) -> tuple[bytes, dict[str, np.ndarray]]:
        payload, delta = self.update(node, **kwargs)  # type: ignore[arg-type]
        self.send(node, payload)
        return payload, delta


def rejected_events(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "update.rejected"]


# --------------------------------------------------------------------------- start


def test_start_publishes_a_retained_global_for_round_one() -> None:
    h = Harness()
    assert h.published == []
    h.agg.start()

    globals_ = h.on(TOPICS.global_model)
    assert len(globals_) == 1
    payload, retain = globals_[0]
    assert retain is True
    first = decode_global(payload)
    assert first.federation == FEDERATION
    assert first.round == 1
    assert first.model == "digits-mlp"
    assert first.final is False
    assert first.plan == PLAN
    assert first.model_id == model_id_of(h.initial)
    for name, array in h.initial.items():
        np.testing.assert_array_equal(first.params[name], array)
    assert h.agg.round == 1
    assert not h.agg.done

    (status_payload, status_retained), *_ = h.on(TOPICS.server)
    status = decode_server_status(status_payload)
    assert status_retained is True
    assert (status.state, status.round, status.reported) == ("waiting", 1, 0)
    assert h.metrics() == []


# --------------------------------------------------------------------------- a full round


def test_round_closes_when_all_expected_nodes_reported() -> None:
    h = Harness()
    h.agg.start()
    first_payload = h.on(TOPICS.global_model)[0][0]

    sent = []
    for node, examples, seed in [("pi-a", 10, 1), ("pi-b", 30, 2), ("pi-c", 60, 3)]:
        payload, delta = h.update(node, num_examples=examples, seed=seed, train_seconds=examples)
        sent.append((node, payload, delta, examples))

    for node, payload, _, _ in sent[:2]:
        h.send(node, payload)
    assert h.metrics() == [], "closed before every expected node reported"
    assert len(h.on(TOPICS.global_model)) == 1
    h.send(sent[2][0], sent[2][1])

    (metrics,) = h.metrics()
    assert metrics.round == 1
    assert metrics.closed_by == "all_reported"
    assert metrics.participants == ["pi-a", "pi-b", "pi-c"]
    assert metrics.num_examples == 100
    assert metrics.uplink_bytes == sum(len(payload) for _, payload, _, _ in sent)
    assert metrics.global_bytes == len(first_payload)
    assert metrics.downlink_bytes == 3 * len(first_payload)
    assert metrics.rejected == {}
    assert metrics.train_loss == pytest.approx(1.25)
    assert metrics.train_seconds_median == pytest.approx(30.0)
    assert metrics.accuracy is None  # no test set given
    assert metrics.seconds == 0.0  # the fake clock did not move

    globals_ = h.globals()
    assert len(globals_) == 2
    second = globals_[1]
    assert h.on(TOPICS.global_model)[1][1] is True  # retained
    assert second.round == 2
    assert second.final is False
    expected = fedavg(h.initial, [(delta, n) for _, _, delta, n in sent])
    for name, array in expected.items():
        assert second.params[name].dtype == np.float32
        np.testing.assert_array_equal(second.params[name], array)
    assert second.model_id == model_id_of(expected) == metrics.model_id == h.agg.model_id
    assert h.agg.round == 2


def test_metrics_are_published_before_the_next_global_and_not_retained() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1))
    h.agg.start()
    h.report("pi-a")
    topics = [topic for topic, _, _ in h.published]
    last_global = max(i for i, topic in enumerate(topics) if topic == TOPICS.global_model)
    assert topics.count(TOPICS.global_model) == 2
    assert topics.index(TOPICS.metrics) < last_global
    assert [retain for _, retain in h.on(TOPICS.metrics)] == [False]


def test_the_weighted_mean_follows_the_examples() -> None:
    """Node B with 3x the examples pulls the global 3x as hard as node A."""
    h = Harness(policy=RoundPolicy(expected_nodes=2, min_nodes=2))
    h.agg.start()
    ones = {name: np.ones(shape, np.float32) for name, shape in MODEL.layout.items()}
    zeros = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    h.report("pi-a", delta=zeros, num_examples=100)
    h.report("pi-b", delta=ones, num_examples=300)
    moved = h.globals()[1].params
    for name, array in h.initial.items():
        np.testing.assert_allclose(moved[name] - array, 0.75, atol=1e-6)


def test_evaluation_on_a_test_set_is_reported() -> None:
    rng = np.random.default_rng(0)
    test = Dataset(rng.uniform(size=(40, 64)).astype(np.float32), rng.integers(0, 10, 40))
    h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1), test=test)
    h.agg.start()
    h.report("pi-a")
    (metrics,) = h.metrics()
    loss, accuracy = evaluate(MODEL, h.globals()[1].params, test)
    assert metrics.loss == pytest.approx(loss)
    assert metrics.accuracy == pytest.approx(accuracy)
    assert 0.0 <= metrics.accuracy <= 1.0


# --------------------------------------------------------------------------- rejections

Bad = Callable[[Harness], tuple[str, bytes]]  # -> (topic node, payload)


def _wrong_round(h: Harness) -> tuple[str, bytes]:
    return "pi-x", h.update("pi-x", round=2)[0]


def _wrong_base(h: Harness) -> tuple[str, bytes]:
    return "pi-x", h.update("pi-x", base_model_id="0" * 32)[0]


def _mismatch(h: Harness) -> tuple[str, bytes]:
    return "pi-x", h.update("pi-y")[0]


def _wrong_federation(h: Harness) -> tuple[str, bytes]:
    return "pi-x", h.update("pi-x", federation="another-fed")[0]


def _garbage(h: Harness) -> tuple[str, bytes]:
    return "pi-x", b"\x00\xff this is not msgpack \xc1"


def _empty(h: Harness) -> tuple[str, bytes]:
    return "pi-x", b""


def _not_a_map(h: Harness) -> tuple[str, bytes]:
    return "pi-x", msgpack.packb([1, 2, 3])


def _oversized(h: Harness) -> tuple[str, bytes]:
    return "pi-x", b"\x80" * (h.settings.max_update_bytes + 1)


def _nan(h: Harness) -> tuple[str, bytes]:
    delta = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    delta["l1.w"][3, 4] = np.nan
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _inf(h: Harness) -> tuple[str, bytes]:
    delta = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    delta["l0.b"][0] = -np.inf
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _wrong_shape(h: Harness) -> tuple[str, bytes]:
    delta = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    delta["l0.w"] = np.zeros((64, 31), np.float32)
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _missing_tensor(h: Harness) -> tuple[str, bytes]:
    delta = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    del delta["l1.b"]
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _extra_tensor(h: Harness) -> tuple[str, bytes]:
    delta = {name: np.zeros(shape, np.float32) for name, shape in MODEL.layout.items()}
    delta["l2.w"] = np.zeros((10, 10), np.float32)
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _renamed_tensor(h: Harness) -> tuple[str, bytes]:
    delta = {name.replace("l0.", "dense0."): np.zeros(shape, np.float32)
             for name, shape in MODEL.layout.items()}  # fmt: skip
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _float16_delta(h: Harness) -> tuple[str, bytes]:
    """<f2 may travel in general, but a dense delta must be the node's float32 numbers."""
    delta = {name: np.zeros(shape, np.float16) for name, shape in MODEL.layout.items()}
    return "pi-x", h.update("pi-x", delta=delta)[0]


def _other_model(h: Harness) -> tuple[str, bytes]:
    """digits-mlp-large's delta is rejected before parsing: it exceeds the dense bound."""
    large = get_model("digits-mlp-large")
    delta = {name: np.zeros(shape, np.float32) for name, shape in large.layout.items()}
    return "pi-x", h.update("pi-x", delta=delta)[0]


REJECTIONS: list[tuple[str, Bad]] = [
    ("wrong_round", _wrong_round),
    ("wrong_base_model", _wrong_base),
    ("node_id_mismatch", _mismatch),
    ("wrong_federation", _wrong_federation),
    ("malformed", _garbage),
    ("malformed", _empty),
    ("malformed", _not_a_map),
    ("oversized", _oversized),
    ("non_finite", _nan),
    ("non_finite", _inf),
    ("layout_mismatch", _wrong_shape),
    ("layout_mismatch", _missing_tensor),
    ("layout_mismatch", _extra_tensor),
    ("layout_mismatch", _renamed_tensor),
    ("oversized", _other_model),
    ("wrong_encoding", _float16_delta),
]


@pytest.mark.parametrize(
    ("reason", "make"), REJECTIONS, ids=[make.__name__.strip("_") for _, make in REJECTIONS]
)
def test_bad_update_is_rejected_logged_and_counted(reason: str, make: Bad) -> None:
    h = Harness()
    h.agg.start()
    before = len(h.published)
    topic_node, payload = make(h)

    with structlog.testing.capture_logs() as logs:
        h.send(topic_node, payload, topic_node=topic_node)  # must not raise

    assert len(h.published) == before, "a rejected update changed what was published"
    (event,) = rejected_events(logs)
    assert event["reason"] == reason
    assert event["log_level"] == "warning"
    assert event["node"] == topic_node
    assert event["round"] == 1
    assert event["detail"]

    # The round carries on and its metrics count the rejection; the bad one did not count.
    sent = [h.report(node, seed=i)[1] for i, node in enumerate(["pi-a", "pi-b", "pi-c"])]
    (metrics,) = h.metrics()
    assert metrics.rejected == {reason: 1}
    assert metrics.participants == ["pi-a", "pi-b", "pi-c"]
    assert metrics.num_examples == 30
    expected = fedavg(h.initial, [(delta, 10) for delta in sent])
    for name, array in expected.items():
        np.testing.assert_array_equal(h.globals()[1].params[name], array)


def test_duplicate_from_the_same_node_is_rejected() -> None:
    h = Harness()
    h.agg.start()
    first, delta = h.report("pi-a", seed=1, num_examples=10)
    with structlog.testing.capture_logs() as logs:
        # Same node again, even with a different delta and weight.
        h.report("pi-a", seed=2, num_examples=1000)
    (event,) = rejected_events(logs)
    assert (event["reason"], event["node"]) == ("duplicate", "pi-a")

    _, delta_b = h.report("pi-b", seed=3)
    _, delta_c = h.report("pi-c", seed=4)
    (metrics,) = h.metrics()
    assert metrics.rejected == {"duplicate": 1}
    assert metrics.num_examples == 30
    assert metrics.uplink_bytes == 3 * len(first)  # equal-sized dense updates
    expected = fedavg(h.initial, [(delta, 10), (delta_b, 10), (delta_c, 10)])
    for name, array in expected.items():
        np.testing.assert_array_equal(h.globals()[1].params[name], array)


def test_a_real_update_over_the_configured_limit_is_oversized() -> None:
    h = Harness(max_update_bytes=1000)
    h.agg.start()
    payload, _ = h.update("pi-a")
    assert len(payload) > 1000
    with structlog.testing.capture_logs() as logs:
        h.send("pi-a", payload)
    assert [e["reason"] for e in rejected_events(logs)] == ["oversized"]


def test_update_on_a_non_update_topic_is_rejected() -> None:
    h = Harness()
    h.agg.start()
    payload, _ = h.update("pi-a")
    with structlog.testing.capture_logs() as logs:
        h.agg.handle(TOPICS.status("pi-a"), payload)
        h.agg.handle("fedmq/another-fed/updates/pi-a", payload)
        h.agg.handle(f"fedmq/{FEDERATION}/updates/pi-a/extra", payload)
    assert [e["reason"] for e in rejected_events(logs)] == ["bad_topic"] * 3


def test_rejection_counts_add_up_and_reset_with_the_round() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1))
    h.agg.start()
    h.send("pi-x", b"garbage")
    h.send("pi-x", b"more garbage")
    h.send("pi-x", h.update("pi-x", round=7)[0])
    h.report("pi-a")
    h.report("pi-a")  # round 2
    first, second = h.metrics()
    assert first.rejected == {"malformed": 2, "wrong_round": 1}
    assert second.rejected == {}


def _mutations(base: dict) -> list[tuple[tuple, object]]:
    """Every field of an update message replaced by every kind of msgpack value."""
    scalars: list[object] = [None, True, 0, -1, 2**63, -(2**63), 1.5, float("nan"), "x", b"x"]
    containers: list[object] = [[], [1], {}, {"a": 1}, [[1]]]
    paths: list[tuple] = [(key,) for key in base]
    paths += [("delta", name) for name in base["delta"]]
    paths += [("delta", name, key) for name in base["delta"] for key in ("shape", "data")]
    paths += [("delta", name, "dtype") for name in base["delta"]]
    return [(path, value) for path in paths for value in scalars + containers]


def test_the_aggregator_never_raises_on_mutated_messages() -> None:
    """Each field of a valid update replaced in turn: the message is accepted or rejected
    (and counted), never an exception out of ``handle``."""
    template = Harness()
    template.agg.start()
    base = msgpack.unpackb(template.update("pi-x")[0], raw=False)
    outcomes = {"accepted": 0, "rejected": 0}
    for path, value in _mutations(base):
        h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1))
        h.agg.start()
        message = copy.deepcopy(base)
        target = message
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        h.send("pi-x", msgpack.packb(message, use_bin_type=True))
        if h.metrics():
            outcomes["accepted"] += 1
            continue
        h.report("pi-ok")
        (metrics,) = h.metrics()
        assert sum(metrics.rejected.values()) == 1, (path, value, metrics.rejected)
        outcomes["rejected"] += 1
    assert outcomes["rejected"] > 300
    assert outcomes["accepted"] > 0  # e.g. an int where a float is expected is fine


@pytest.mark.parametrize("dtype", [[], ["<f4"], {"a": 1}])
def test_unhashable_dtype_does_not_crash(dtype: object) -> None:
    """A list/map dtype raised TypeError out of decode_tensor before 4e3ad62."""
    h = Harness()
    h.agg.start()
    message = msgpack.unpackb(h.update("pi-x")[0], raw=False)
    message["delta"]["l0.w"]["dtype"] = dtype
    with structlog.testing.capture_logs() as logs:
        h.send("pi-x", msgpack.packb(message, use_bin_type=True))
    assert [e["reason"] for e in rejected_events(logs)] == ["bad_dtype"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_the_aggregator_never_raises_on_random_bytes(payload: bytes) -> None:
    h = Harness()
    h.agg.start()
    before = len(h.published)
    with structlog.testing.capture_logs() as logs:
        h.send("pi-x", payload)
    assert len(h.published) == before
    assert len(rejected_events(logs)) == 1


def test_an_extreme_train_loss_is_accepted_and_keeps_the_metrics_finite() -> None:
    """train_loss 1e308 x 10 examples overflowed the weighted sum to inf (metrics then
    failed decode_metrics). Rejecting such updates as bad_field was no cure: after a
    poisoning honest nodes reported losses near 1e30, every update was rejected and the
    run stalled for good. A finite loss is accepted, saturated to MAX_LOSS."""
    h = Harness(policy=RoundPolicy(expected_nodes=2, min_nodes=2))
    h.agg.start()
    with structlog.testing.capture_logs() as logs:
        h.report("pi-a", train_loss=1e308, num_examples=10)
        h.report("pi-b", train_loss=-1e30, num_examples=10)
    assert rejected_events(logs) == []
    (metrics,) = h.metrics()  # decodes
    assert metrics.participants == ["pi-a", "pi-b"] and metrics.rejected == {}
    assert metrics.train_loss == 0.0  # (MAX_LOSS - MAX_LOSS) / 2


def test_the_largest_accepted_losses_and_weights_keep_the_metrics_finite() -> None:
    h = Harness()
    h.agg.start()
    for node in ("pi-a", "pi-b", "pi-c"):
        h.report(node, train_loss=MAX_LOSS, num_examples=MAX_EXAMPLES)
    (metrics,) = h.metrics()
    assert metrics.train_loss == pytest.approx(MAX_LOSS)
    assert metrics.num_examples == 3 * MAX_EXAMPLES


# --------------------------------------------------------------------------- deadline


def test_deadline_closes_with_a_quorum() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=3, min_nodes=2, deadline_seconds=5))
    h.agg.start()
    assert h.agg.timeout() == pytest.approx(5.0)
    h.clock.now += 1.0
    _, delta_a = h.report("pi-a", seed=1, num_examples=10)
    _, delta_b = h.report("pi-b", seed=2, num_examples=20)
    assert h.agg.timeout() == pytest.approx(4.0)

    h.clock.now += 3.9  # 4.9 s after opening
    h.agg.tick()
    assert h.metrics() == []

    h.clock.now += 0.2  # 5.1 s
    assert h.agg.timeout() == 0.0
    h.agg.tick()
    (metrics,) = h.metrics()
    assert metrics.closed_by == "deadline"
    assert metrics.participants == ["pi-a", "pi-b"]
    assert metrics.num_examples == 30
    assert metrics.seconds == pytest.approx(5.1)
    assert metrics.downlink_bytes == 2 * metrics.global_bytes
    expected = fedavg(h.initial, [(delta_a, 10), (delta_b, 20)])
    for name, array in expected.items():
        np.testing.assert_array_equal(h.globals()[1].params[name], array)
    # The next round opens now, with a fresh deadline.
    assert h.agg.round == 2
    assert h.agg.timeout() == pytest.approx(5.0)


def test_deadline_without_quorum_keeps_the_round_open() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=3, min_nodes=2, deadline_seconds=5))
    h.agg.start()
    h.report("pi-a")
    for _ in range(3):
        h.clock.now += 10.0
        h.agg.tick()
    assert h.metrics() == []
    assert len(h.on(TOPICS.global_model)) == 1
    assert h.agg.round == 1
    # The second report, long after the deadline, closes it on arrival.
    h.report("pi-b", seed=5)
    (metrics,) = h.metrics()
    assert metrics.closed_by == "deadline"
    assert metrics.participants == ["pi-a", "pi-b"]


def test_without_deadline_tick_never_closes() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=3, min_nodes=1))
    h.agg.start()
    h.report("pi-a")
    h.report("pi-b", seed=1)
    assert h.agg.timeout() is None
    h.clock.now += 1e6
    h.agg.tick()
    assert h.metrics() == []


# --------------------------------------------------------------------------- the end


def test_after_the_last_round_the_global_is_final_and_late_updates_are_rejected() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=2, min_nodes=2), rounds=2)
    h.agg.start()
    for _ in range(2):
        h.report("pi-a", seed=h.agg.round)
        h.report("pi-b", seed=10 + h.agg.round)

    assert h.agg.done
    assert [m.round for m in h.metrics()] == [1, 2]
    globals_ = h.globals()
    assert [(g.round, g.final) for g in globals_] == [(1, False), (2, False), (3, True)]
    assert globals_[-1].model_id == h.metrics()[-1].model_id
    final_status = decode_server_status(h.on(TOPICS.server)[-1][0])
    assert final_status.state == "done"
    assert h.agg.timeout() == 0.0

    published = len(h.published)
    late = [
        h.update("pi-c")[0],  # against the final model, "round 3"
        h.update("pi-c", round=2)[0],  # for the last real round
    ]
    with structlog.testing.capture_logs() as logs:
        for payload in late:
            h.send("pi-c", payload)
        h.clock.now += 1e6
        h.agg.tick()
    assert [e["reason"] for e in rejected_events(logs)] == ["wrong_round", "wrong_round"]
    assert len(h.published) == published
    assert len(h.metrics()) == 2


def test_accepted_update_logs_no_rejection() -> None:
    h = Harness()
    h.agg.start()
    with structlog.testing.capture_logs() as logs:
        h.report("pi-a")
    assert rejected_events(logs) == []
    assert [e["event"] for e in logs] == ["update.accepted"]


def test_a_copy_resent_after_the_round_closed_counts_as_duplicate() -> None:
    """After a reconnect a node resends its last update; if that round has already closed,
    the copy is a duplicate of an accepted update, not a straggler."""
    h = Harness()
    h.agg.start()
    copies = {node: h.report(node, seed=i)[0] for i, node in enumerate(["pi-a", "pi-b", "pi-c"])}
    assert h.agg.round == 2
    straggler = h.update("pi-x", round=1)[0]
    with structlog.testing.capture_logs() as logs:
        h.send("pi-a", copies["pi-a"])
        h.send("pi-x", straggler)
    assert [e["reason"] for e in rejected_events(logs)] == ["duplicate", "wrong_round"]


def test_republish_sends_the_open_rounds_global_again() -> None:
    h = Harness()
    h.agg.republish()  # before start: nothing to republish
    assert h.published == []
    h.agg.start()
    h.agg.republish()
    first, again = h.on(TOPICS.global_model)
    assert first == again and again[1] is True
    assert decode_server_status(h.on(TOPICS.server)[-1][0]).round == 1


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def assert_one_outcome(h: Harness, message: dict) -> None:
    """Sent as pi-x: exactly one of accepted or rejected is logged, and only an accepted
    update is counted as reported."""
    with structlog.testing.capture_logs() as logs:
        h.send("pi-x", msgpack.packb(message, use_bin_type=True))
    outcomes = [e["event"] for e in logs if e["event"] in ("update.accepted", "update.rejected")]
    assert len(outcomes) == 1
    assert (outcomes == ["update.accepted"]) == (h.agg.reported == 1)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_a_valid_update_with_any_field_replaced_is_accepted_or_rejected_never_raises(data) -> None:  # type: ignore[no-untyped-def]
    """Structured fuzzing: one field anywhere in a valid update (top level, a tensor's
    header, the delta map) gets an arbitrary msgpack value."""
    h = Harness()
    h.agg.start()
    message = msgpack.unpackb(h.update("pi-x")[0], raw=False)
    target = data.draw(st.sampled_from(["top", "delta", "tensor"]))
    container = {
        "top": message,
        "delta": message["delta"],
        "tensor": message["delta"][data.draw(st.sampled_from(sorted(message["delta"])))],
    }[target]
    key = data.draw(st.sampled_from([*sorted(container), "extra"]))
    container[key] = data.draw(wire_values)
    assert_one_outcome(h, message)


FLAT_SPEC = "topk:0.05+sign+ef+flat"


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_a_valid_flat_update_with_any_field_replaced_or_its_bytes_spoiled_never_raises(
    data,
) -> None:  # type: ignore[no-untyped-def]
    """Structured fuzzing of the flat form: a key of the update or of its flat delta map
    gets an arbitrary msgpack value, or one of its bin fields is cut, grown or has a byte
    changed. Exactly one outcome is logged; only an accepted update is counted."""
    h = Harness(plan=replace(PLAN, compression=FLAT_SPEC))
    h.agg.start()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    delta = {n: rng.normal(0.0, 0.01, s).astype(np.float32) for n, s in MODEL.layout.items()}
    encoded, _ = parse_spec(FLAT_SPEC).compress(delta, rng, None)
    message = msgpack.unpackb(
        h.update("pi-x", delta=encoded, compression=FLAT_SPEC)[0],
        raw=False,  # type: ignore[arg-type]
    )
    flat = message["delta"]
    assert flat["enc"] == "flat"
    how = data.draw(st.sampled_from(["top", "flat", "bytes"]))
    if how == "bytes":
        key = data.draw(st.sampled_from(["upper", "lower", "scales", "data"]))
        raw = bytearray(flat[key])
        if raw and data.draw(st.booleans()):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        flat[key] = bytes(raw[: data.draw(st.integers(0, len(raw) + 1))]) + data.draw(
            st.binary(max_size=3)
        )
    else:
        container = message if how == "top" else flat
        key = data.draw(st.sampled_from([*sorted(container), "extra"]))
        container[key] = data.draw(wire_values)
    assert_one_outcome(h, message)


def test_broker_dropped_counts_the_rounds_increase_across_a_broker_restart() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1), rounds=3)
    h.agg.start()
    h.report("pi-a")  # round 1: the broker never published its counter
    h.drops.note(40)  # first reading: counting starts here
    h.drops.note(45)
    h.report("pi-a")  # round 2
    h.drops.note(47)
    h.drops.note(3)  # the broker restarted: its counter began again at 0
    h.report("pi-a")  # round 3
    assert [m.broker_dropped for m in h.metrics()] == [None, 5, 5]


def test_broker_dropped_is_zero_when_the_counter_has_been_still_for_a_minute() -> None:
    # issue 11: mosquitto publishes the counter (retained, expiring after 60 s) only when
    # it changes, so an aggregator that joins a broker whose counter has not moved for a
    # minute gets no reading; $SYS/broker/version (retained, no expiry) arriving after the
    # subscription with no counter before it says so
    h = Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1), rounds=4)
    h.agg.start()
    h.drops.note_unchanged()
    h.report("pi-a")  # round 1: nothing dropped
    h.report("pi-a")  # round 2: nothing dropped
    h.drops.note(1234)  # a change from an unknown value: at least one
    h.drops.note_unchanged()  # a reconnect: the reading stands
    h.drops.note(1240)
    h.report("pi-a")  # round 3
    h.report("pi-a")  # round 4
    assert [m.broker_dropped for m in h.metrics()] == [0, 0, 7, 0]


# --------------------------------------------------------------------------- non-finite metrics


def test_a_diverged_model_gives_metrics_that_decode_and_a_checkpoint_that_resumes(
    tmp_path: Path,
) -> None:
    """On digits-mlp-large one accepted update of large (in-range) values made the test
    loss NaN: the metrics went out undecodable and the checkpoint holding them could not
    be resumed (``non_finite: loss is nan``). A non-finite metric goes out as nil, named
    in ``non_finite``."""
    from fedmq.aggregator.app import resume_or_start
    from fedmq.aggregator.checkpoint import StateDir
    from fedmq.datasets import digits

    large = get_model("digits-mlp-large")
    settings = RoundSettings(
        federation=FEDERATION,
        model_name="digits-mlp-large",
        model=large,
        rounds=3,
        policy=RoundPolicy(expected_nodes=1, min_nodes=1),
        plan=PLAN,
        max_update_bytes=dense_update_bound(large),
    )
    published: list[tuple[str, bytes, bool]] = []

    def build(store: StateDir) -> Aggregator:
        return Aggregator(
            settings,
            large.init(0),
            publish=lambda t, p, r: published.append((t, p, r)),
            test=digits()[1],
            clock=FakeClock(),
            wall_clock=lambda: 1.7e9,
            store=store,
        )

    store = StateDir(tmp_path)
    agg = build(store)
    agg.start()
    signs = np.random.default_rng(1)
    delta = {
        name: (1e15 * np.sign(signs.normal(size=shape))).astype(np.float32)
        for name, shape in large.layout.items()
    }
    update = NodeUpdate(
        federation=FEDERATION, node_id="pi-a", round=1, base_model_id=agg.model_id,
        num_examples=10, train_loss=1.0, train_seconds=0.5, delta=delta,
    )  # fmt: skip
    agg.handle(TOPICS.update("pi-a"), encode(update))
    assert agg.round == 2
    (metrics,) = [decode_metrics(p) for t, p, _ in published if t == TOPICS.metrics]
    assert metrics.loss is None and metrics.extra["non_finite"] == ["loss"]
    assert metrics.accuracy is not None
    store.close()

    store = StateDir(tmp_path)
    again = build(store)
    assert resume_or_start(again, store)
    store.close()
    assert again.round == 2 and again.history[0].loss is None


# --------------------------------------------------------------------------- default policy


def test_by_default_a_round_closes_at_a_deadline_with_a_majority() -> None:
    """`fedmq aggregator` without --round-timeout / --min-nodes waited for every node:
    one missing node stalled the fleet forever."""
    from fedmq import cli
    from fedmq.aggregator.app import round_policy
    from fedmq.aggregator.rounds import DEFAULT_DEADLINE_SECONDS
    from fedmq.aggregator.settings import AggregatorSettings

    args = cli.build_parser().parse_args(["aggregator", "--broker", "127.0.0.1:1883"])
    assert args.round_timeout == DEFAULT_DEADLINE_SECONDS == 300.0
    assert args.min_nodes is None
    config = AggregatorSettings(
        broker=args.broker, federation="f", nodes=3, round_timeout=args.round_timeout
    )
    h = Harness(policy=round_policy(config))
    h.agg.start()
    h.report("pi-a")
    h.report("pi-b", seed=1)
    h.clock.now += DEFAULT_DEADLINE_SECONDS - 1
    h.agg.tick()
    assert h.metrics() == []
    h.clock.now += 1
    h.agg.tick()
    (metrics,) = h.metrics()
    assert (metrics.closed_by, metrics.participants) == ("deadline", ["pi-a", "pi-b"])


def test_round_timeout_none_waits_for_every_node() -> None:
    from fedmq import cli

    args = cli.build_parser().parse_args(
        ["aggregator", "--broker", "127.0.0.1:1883", "--round-timeout", "none"]
    )
    assert args.round_timeout is None


def test_past_the_deadline_short_of_the_quorum_it_says_so_once_and_waits() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=3, min_nodes=2, deadline_seconds=5))
    h.agg.start()
    h.report("pi-a")
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            h.clock.now += 10.0
            h.agg.tick()
    waiting = [e for e in logs if e["event"] == "round.short_of_quorum"]
    assert len(waiting) == 1
    assert (waiting[0]["reported"], waiting[0]["min_nodes"]) == (1, 2)
    assert h.agg.timeout() is None  # only an update can close it now: no busy polling
    h.report("pi-b", seed=5)
    assert h.metrics()[0].closed_by == "deadline"
