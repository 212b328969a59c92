"""A stopping aggregator waits for the broker's acknowledgements only while it has a
broker: with the broker gone, SIGTERM must end it within a second, as it ends a node."""

import time

import structlog

from fedmq.aggregator.app import leave
from fedmq.schemas import Topics


class GoneClient:
    """A paho client whose broker went away: not connected, nothing ever acknowledged."""

    def is_connected(self) -> bool:
        return False

    def disconnect(self) -> None: ...

    def loop_stop(self) -> None: ...


class NeverAcknowledged:
    unacknowledged = 3

    def __init__(self) -> None:
        self.waited = 0.0

    def flush(self, timeout: float) -> bool:
        self.waited += timeout
        time.sleep(min(timeout, 0.05))
        return False


def test_leaving_without_a_broker_does_not_wait_for_acknowledgements() -> None:
    outbox = NeverAcknowledged()
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        leave(GoneClient(), outbox, Topics("t"), done=False)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    assert outbox.waited < 1.0
    assert {"event": "aggregator.unacknowledged", "messages": 3, "log_level": "warning"} in logs
