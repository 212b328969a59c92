"""The round lifecycle as an explicit policy and a pure "is the round ready?" function."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundPolicy:
    """When a round closes.

    A round closes as soon as ``expected_nodes`` distinct nodes have reported, or once
    ``deadline_seconds`` have passed since it opened if at least ``min_nodes`` have
    reported. With fewer than ``min_nodes`` at the deadline the round stays open (it is
    extended) until the minimum is reached. ``deadline_seconds=None`` waits for everyone.
    """

    expected_nodes: int
    min_nodes: int
    deadline_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.expected_nodes < 1:
            raise ValueError("expected_nodes must be at least 1")
        if not 1 <= self.min_nodes <= self.expected_nodes:
            raise ValueError("min_nodes must be between 1 and expected_nodes")
        if self.deadline_seconds is not None and not 0 < self.deadline_seconds < float("inf"):
            raise ValueError("deadline_seconds must be a positive number of seconds")


def close_reason(policy: RoundPolicy, *, reported: int, opened_at: float, now: float) -> str | None:
    """``"all_reported"``, ``"deadline"`` or None (keep the round open)."""
    if reported >= policy.expected_nodes:
        return "all_reported"
    if (
        policy.deadline_seconds is not None
        and reported >= policy.min_nodes
        and now - opened_at >= policy.deadline_seconds
    ):
        return "deadline"
    return None


def seconds_until_check(policy: RoundPolicy, *, opened_at: float, now: float) -> float | None:
    """How long the event loop may sleep before the deadline could change the answer."""
    if policy.deadline_seconds is None:
        return None
    return max(0.0, opened_at + policy.deadline_seconds - now)
