"""The round policy and its pure "is the round ready?" functions."""

import math

import pytest

from fedmq.aggregator.rounds import (
    DEFAULT_DEADLINE_SECONDS,
    RoundPolicy,
    close_reason,
    default_quorum,
    seconds_until_check,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expected_nodes": 0, "min_nodes": 0}, "expected_nodes must be at least 1"),
        ({"expected_nodes": -2, "min_nodes": 1}, "expected_nodes must be at least 1"),
        ({"expected_nodes": 3, "min_nodes": 0}, "min_nodes must be between"),
        ({"expected_nodes": 3, "min_nodes": 4}, "min_nodes must be between"),
        ({"expected_nodes": 3, "min_nodes": 2, "deadline_seconds": 0}, "deadline_seconds"),
        ({"expected_nodes": 3, "min_nodes": 2, "deadline_seconds": -1.5}, "deadline_seconds"),
    ],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoundPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("deadline", [math.nan, math.inf])
def test_non_finite_deadline_is_rejected(deadline: float) -> None:
    """NaN would never close by deadline yet make seconds_until_check return 0.0 (a busy
    event loop); inf is "no deadline" spelled ambiguously. Was accepted before 4e3ad62."""
    with pytest.raises(ValueError, match="deadline_seconds"):
        RoundPolicy(expected_nodes=3, min_nodes=2, deadline_seconds=deadline)


@pytest.mark.parametrize(
    ("expected", "minimum", "deadline"),
    [(1, 1, None), (5, 5, None), (5, 1, 0.001), (3, 2, 30.0)],
)
def test_valid_policies_are_accepted(expected: int, minimum: int, deadline: float | None) -> None:
    policy = RoundPolicy(expected_nodes=expected, min_nodes=minimum, deadline_seconds=deadline)
    assert (policy.expected_nodes, policy.min_nodes, policy.deadline_seconds) == (
        expected,
        minimum,
        deadline,
    )


def test_policy_is_frozen() -> None:
    policy = RoundPolicy(expected_nodes=3, min_nodes=2)
    with pytest.raises(AttributeError):
        policy.min_nodes = 1  # type: ignore[misc]


WITH_DEADLINE = RoundPolicy(expected_nodes=3, min_nodes=2, deadline_seconds=5.0)
NO_DEADLINE = RoundPolicy(expected_nodes=3, min_nodes=2)


@pytest.mark.parametrize("policy", [WITH_DEADLINE, NO_DEADLINE])
def test_all_reported_closes_at_once(policy: RoundPolicy) -> None:
    assert close_reason(policy, reported=3, opened_at=100.0, now=100.0) == "all_reported"
    # "all reported" wins over the deadline when both hold.
    assert close_reason(policy, reported=3, opened_at=100.0, now=1e6) == "all_reported"


def test_before_the_deadline_the_round_stays_open() -> None:
    for reported in (0, 1, 2):
        assert close_reason(WITH_DEADLINE, reported=reported, opened_at=100.0, now=104.99) is None


@pytest.mark.parametrize("now", [105.0, 105.01, 1e6])
def test_deadline_with_quorum_closes(now: float) -> None:
    assert close_reason(WITH_DEADLINE, reported=2, opened_at=100.0, now=now) == "deadline"


@pytest.mark.parametrize("now", [105.0, 200.0, 1e6])
def test_deadline_without_quorum_is_extended(now: float) -> None:
    assert close_reason(WITH_DEADLINE, reported=1, opened_at=100.0, now=now) is None
    assert close_reason(WITH_DEADLINE, reported=0, opened_at=100.0, now=now) is None
    # ... until the minimum arrives, which then closes it by deadline.
    assert close_reason(WITH_DEADLINE, reported=2, opened_at=100.0, now=now) == "deadline"


@pytest.mark.parametrize("now", [0.0, 5.0, 1e9])
def test_no_deadline_waits_for_everyone(now: float) -> None:
    for reported in (0, 1, 2):
        assert close_reason(NO_DEADLINE, reported=reported, opened_at=0.0, now=now) is None


def test_min_equal_to_expected_needs_everyone_even_after_the_deadline() -> None:
    policy = RoundPolicy(expected_nodes=2, min_nodes=2, deadline_seconds=1.0)
    assert close_reason(policy, reported=1, opened_at=0.0, now=50.0) is None
    assert close_reason(policy, reported=2, opened_at=0.0, now=0.5) == "all_reported"


def test_seconds_until_check_counts_down_to_the_deadline() -> None:
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=100.0) == pytest.approx(5.0)
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=103.5) == pytest.approx(1.5)
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=105.0) == 0.0


def test_seconds_until_check_never_goes_negative() -> None:
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=107.0) == 0.0
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=1e9) == 0.0


def test_seconds_until_check_without_deadline_is_none() -> None:
    assert seconds_until_check(NO_DEADLINE, opened_at=100.0, now=100.0) is None
    assert seconds_until_check(NO_DEADLINE, opened_at=100.0, now=1e9) is None


@pytest.mark.parametrize(("nodes", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (10, 6), (51, 26)])
def test_the_default_quorum_is_more_than_half(nodes: int, quorum: int) -> None:
    assert default_quorum(nodes) == quorum


def test_the_default_deadline_closes_a_round_a_node_never_reports_to() -> None:
    """Without a deadline by default, one missing node stalled a fleet forever."""
    policy = RoundPolicy(
        expected_nodes=10, min_nodes=default_quorum(10), deadline_seconds=DEFAULT_DEADLINE_SECONDS
    )
    before = DEFAULT_DEADLINE_SECONDS - 1
    assert close_reason(policy, reported=9, opened_at=0.0, now=before) is None
    assert close_reason(policy, reported=9, opened_at=0.0, now=before + 1) == "deadline"


def test_past_the_deadline_short_of_the_quorum_only_an_update_can_close() -> None:
    """The event loop then waits for a message instead of polling every 0 s."""
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=106.0, reported=0) is None
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=106.0, reported=2) == 0.0
    assert seconds_until_check(WITH_DEADLINE, opened_at=100.0, now=101.0, reported=0) == 4.0
