"""The aggregator's parts are replaceable: a version policy is one class, a server update
one (init, update) pair, and the server uses what it is given."""

from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmq.aggregator.broker_drops import BrokerDrops
from fedmq.aggregator.fedavg import WeightedSum, apply_mean_delta
from fedmq.aggregator.optimizer import ServerOptimizer, apply_delta
from fedmq.aggregator.policy import OpenVersion, Problem, Progress
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator
from fedmq.schemas import NodeUpdate, model_id_of
from tests.unit.test_aggregator_server import MODEL, Harness


@dataclass(frozen=True)
class EveryK:
    """A new version every ``k`` accepted updates, whoever sends them: a policy that is
    not rounds, written against ``VersionPolicy`` alone."""

    k: int

    def select(
        self, candidates: Iterable[str], *, seed: int, version: int
    ) -> tuple[str, ...] | None:
        return None

    def addressed(self, update: NodeUpdate, node: str, current: OpenVersion) -> Problem | None:
        if current.final or update.round != current.number:
            return "wrong_round", f"{update.round} is not {current.number}"
        return None

    def fits(
        self, update: NodeUpdate, node: str, current: OpenVersion, held: Collection[str]
    ) -> Problem | None:
        if update.base_model_id != current.model_id:
            return "wrong_base_model", update.base_model_id
        return ("duplicate", node) if node in held else None

    def close_reason(self, current: OpenVersion, *, held: int, now: float) -> str | None:
        return "all_reported" if held >= self.k else None

    def seconds_until_check(self, current: OpenVersion, *, held: int, now: float) -> None:
        return None

    def overdue(
        self, current: OpenVersion, *, held: int, now: float
    ) -> tuple[str, dict[str, Any]] | None:
        return None

    def progress(self, current: OpenVersion) -> Progress:
        return Progress(expected_nodes=self.k, min_nodes=self.k, deadline_seconds=None)

    def most_updates(self, fleet: int) -> int:
        return self.k

    @property
    def window(self) -> int:
        return 0

    def key(self, update: NodeUpdate, node: str) -> str:
        return node

    def scale(self, update: NodeUpdate, current: OpenVersion) -> float:
        return 1.0


def rebuilt(h: Harness, **parts: Any) -> Harness:
    """The harness's aggregator built again with other parts."""
    h.agg = Aggregator(
        h.settings,
        h.initial,
        publish=lambda topic, payload, retain: h.published.append((topic, payload, retain)),
        clock=h.clock,
        wall_clock=lambda: 1.7e9,
        **parts,
    )
    return h


def test_a_version_policy_other_than_rounds_is_one_class() -> None:
    h = Harness(rounds=2)
    h.settings = replace(h.settings, policy=EveryK(2))  # type: ignore[arg-type]
    rebuilt(h)
    h.agg.start()
    h.report("pi-a")
    assert (h.agg.version, h.agg.reported) == (1, 1)
    h.report("pi-a")  # the policy's own duplicate check
    h.report("pi-b")  # the second update makes version 2
    assert (h.agg.version, h.agg.reported) == (2, 0)
    (metrics,) = h.metrics()
    assert metrics.participants == ["pi-a", "pi-b"]
    assert metrics.rejected == {"duplicate": 1}
    assert h.agg.server_status().expected_nodes == 2
    h.report("pi-c")
    h.report("pi-d")
    assert h.agg.done and [g.final for g in h.globals()] == [False, False, True]
    assert h.agg.timeout() == 0.0


def test_the_server_update_is_given_and_its_state_carried_between_versions() -> None:
    seen: list[int] = []

    def init(params: Any) -> int:
        return 0

    def half_step(params: Any, delta: Any, state: int) -> tuple[dict[str, np.ndarray], int]:
        seen.append(state)
        half = {name: array / 2 for name, array in delta.items()}
        return apply_mean_delta(params, half), state + 1

    h = rebuilt(
        Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1), rounds=2),
        optimizer=ServerOptimizer(init, half_step),
    )
    h.agg.start()
    _, delta = h.report("pi-a", seed=1)
    _, _ = h.report("pi-a", seed=2)
    assert seen == [0, 1]
    total = WeightedSum(MODEL.layout)
    total.add(delta, 10)
    first = apply_mean_delta(h.initial, {n: a / 2 for n, a in total.mean().items()})
    assert h.globals()[1].model_id == model_id_of(first)
    assert h.metrics()[0].model_id == model_id_of(first)


def test_fedavgs_server_update_is_the_mean_delta_added_and_keeps_no_state() -> None:
    params = MODEL.init(0)
    delta = {name: np.full(a.shape, 0.5) for name, a in params.items()}
    optimizer = apply_delta()
    state = optimizer.init(params)
    moved, after = optimizer.update(params, delta, state)
    assert after == state == ()
    for name, array in apply_mean_delta(params, delta).items():
        assert moved[name].tobytes() == array.tobytes()


def test_broker_drops_are_counted_at_the_edge_and_taken_per_version() -> None:
    drops = BrokerDrops()
    h = rebuilt(
        Harness(policy=RoundPolicy(expected_nodes=1, min_nodes=1), rounds=2),
        broker_dropped=drops.take,
    )
    h.agg.start()
    drops.note(10)
    drops.note(12)
    h.report("pi-a")
    drops.note(13)
    h.report("pi-a")
    assert [m.broker_dropped for m in h.metrics()] == [2, 1]
