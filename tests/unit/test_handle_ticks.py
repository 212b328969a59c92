"""``Aggregator.handle`` ticks only after the updates that may close the version and once
time may (``_plan_ticks``). Pinned here against the old way, a tick after every message
(``ingest`` then ``tick``), on the same messages and clock: the same versions from the
same updates, the same rejections, publications and log events, whatever the order,
the deadline, the quorum, sampling, surplus nodes or late and bad updates."""

from dataclasses import dataclass, field

import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.aggregator.buffer import BufferPolicy
from fedmq.aggregator.policy import VersionPolicy
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.schemas import Topics

from .test_aggregator_server import FEDERATION, Harness

TOPICS = Topics(FEDERATION)
NODES = [f"pi-{i}" for i in range(7)]

# One step: an update from a node (good: for the open round; next: for the round after;
# first: trained on round 1's model, as sent before round 1 closed),
# time passing, or the MQTT edge's idle tick.
STEP = st.one_of(
    st.tuples(
        st.just("update"), st.sampled_from(NODES), st.sampled_from(["good", "next", "first"])
    ),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.5, 5.0, 40.0])),
    st.tuples(st.just("idle")),
)

POLICY = st.one_of(
    st.builds(
        lambda expected, quorum, deadline, fraction: RoundPolicy(
            expected_nodes=expected,
            min_nodes=min(quorum, expected),
            deadline_seconds=deadline,
            sample_fraction=fraction,
        ),
        st.integers(1, 5),
        st.integers(1, 5),
        st.sampled_from([None, 5.0, 30.0]),
        st.sampled_from([1.0, 0.5]),
    ),
    st.builds(
        lambda buffer, deadline: BufferPolicy(buffer=buffer, deadline_seconds=deadline),
        st.integers(1, 4),
        st.sampled_from([None, 5.0]),
    ),
)


def run(policy: VersionPolicy, steps: list[tuple], *, every_message: bool) -> tuple:
    h = Harness(policy=policy, rounds=3, known_nodes=frozenset(NODES[:5]))
    with structlog.testing.capture_logs() as logs:
        h.agg.start()
        first = h.agg.model_id
        for n, step in enumerate(steps):
            if step[0] == "advance":
                h.clock.now += step[1]
            elif step[0] == "idle":
                h.agg.tick()
            else:
                _, node, kind = step
                shift: dict[str, object] = {}
                if kind == "next":
                    shift = {"round": h.agg.round + 1}
                elif kind == "first":
                    shift = {"round": 1, "base_model_id": first}
                payload, _ = h.update(node, seed=n, **shift)
                if every_message:
                    h.agg.ingest(TOPICS.update(node), payload)
                    h.agg.tick()
                else:
                    h.send(node, payload)
    events = [(e["event"], e.get("reason"), e.get("node"), e.get("round")) for e in logs]
    return h.published, events, h.agg.round, sorted(h.agg.held), h.agg.done


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(POLICY, st.lists(STEP, max_size=40))
def test_handle_decides_as_a_tick_after_every_message(policy, steps):
    assert run(policy, steps, every_message=False) == run(policy, steps, every_message=True)


def test_an_update_past_the_quorum_in_one_batch_is_refused_as_before():
    """Three expected of five known: the fourth update of round 1 comes after the close,
    in the same batch or not, and is refused as for a round no longer open."""
    steps = [("update", node, "first") for node in NODES[:5]]
    new = run(RoundPolicy(expected_nodes=3, min_nodes=3), steps, every_message=False)
    old = run(RoundPolicy(expected_nodes=3, min_nodes=3), steps, every_message=True)
    assert new == old
    _, events, version, held, _ = new
    assert version == 2 and held == []  # round 2 open; the late ones trained on round 1
    refused = [e for e in events if e[0] == "update.rejected"]
    assert [(e[1], e[2]) for e in refused] == [("wrong_round", "pi-3"), ("wrong_round", "pi-4")]


def test_the_deadline_closes_at_the_first_message_after_it_as_before():
    """Quorum 2 of 4 by a 5 s deadline: after it, a refused update closes the round (as
    a tick after it did) and the next good one goes to round 2's count, not round 1's."""
    policy = RoundPolicy(expected_nodes=4, min_nodes=2, deadline_seconds=5.0)
    steps = [
        ("update", "pi-0", "good"),
        ("update", "pi-1", "good"),
        ("advance", 10.0),
        ("update", "pi-2", "next"),
        ("update", "pi-3", "good"),
    ]
    new = run(policy, steps, every_message=False)
    assert new == run(policy, steps, every_message=True)
    _, events, version, _, _ = new
    assert version == 2
    closed = [e for e in events if e[0] == "round.closed"]
    assert closed and closed[0][3] == 1


def test_short_of_quorum_past_the_deadline_is_said_at_the_first_message_as_before():
    policy = RoundPolicy(expected_nodes=4, min_nodes=3, deadline_seconds=5.0)
    steps = [("update", "pi-0", "good"), ("advance", 10.0), ("update", "pi-1", "next")]
    new = run(policy, steps, every_message=False)
    assert new == run(policy, steps, every_message=True)
    assert ("round.short_of_quorum", None, None, 1) in new[1]


def test_a_refused_update_right_at_the_deadline_closes_the_round_as_before():
    """The quorum is in before the deadline; the first message at the deadline itself,
    refused, is the one whose tick closes the round (not a later one)."""
    policy = RoundPolicy(expected_nodes=4, min_nodes=2, deadline_seconds=5.0)
    steps = [
        ("update", "pi-0", "good"),
        ("update", "pi-1", "good"),
        ("advance", 2.5),
        ("advance", 2.5),
        ("update", "pi-2", "next"),
        ("update", "pi-3", "first"),
    ]
    new = run(policy, steps, every_message=False)
    assert new == run(policy, steps, every_message=True)
    _, events, version, _, _ = new
    assert version == 2
    refused = [(e[1], e[2]) for e in events if e[0] == "update.rejected"]
    assert refused == [("wrong_round", "pi-2"), ("wrong_round", "pi-3")]


@dataclass(frozen=True)
class NeverByCount(RoundPolicy):
    """A round policy that no held count closes (none of fedmq's own): counts its questions."""

    asked: list[int] = field(default_factory=list)

    def close_reason(self, current, *, held, now):  # type: ignore[no-untyped-def]
        self.asked.append(held)
        return None


def test_a_policy_no_count_closes_is_searched_once_a_version_then_ticked_per_update():
    """``_plan_ticks`` looks up to 2**24 above the held count (~24 questions) for one that
    closes; when none does it ticks after every update, as before, without asking again."""
    policy = NeverByCount(expected_nodes=5, min_nodes=5)
    h = Harness(policy=policy, rounds=3, known_nodes=frozenset(NODES))
    h.agg.start()
    for n, node in enumerate(NODES):
        policy.asked.clear()
        payload, _ = h.update(node, seed=n)
        h.send(node, payload)
        assert sorted(h.agg.held) == sorted(NODES[: n + 1])
        # the first update's tick and search; after it, the tick alone
        assert len(policy.asked) == (1 + 25 if n == 0 else 1), (n, policy.asked)
