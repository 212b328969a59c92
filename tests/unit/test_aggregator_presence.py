"""What the aggregator makes of nodes' statuses: presence for the round's quorum, and a
node's error (a refused model) in the aggregator's own log, with the node's reason."""

import structlog

from fedmq.aggregator.app import note_presence
from fedmq.schemas import NodeStatus, encode


class Presence:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def note_presence(self, node_id: str, online: bool) -> None:
        self.seen.append((node_id, online))


def status(state: str, detail: str | None = None) -> bytes:
    return encode(NodeStatus(federation="f", node_id="pi-3", state=state, round=4,
                             num_examples=10, at=1.0, detail=detail))  # fmt: skip


def test_a_refusing_node_is_present_and_its_reason_is_logged() -> None:
    presence = Presence()
    why = "cannot build this model: the global model does not match task 'x': ..."
    with structlog.testing.capture_logs() as logs:
        note_presence(presence, "pi-3", status("error", why))  # type: ignore[arg-type]
        note_presence(presence, "pi-3", status("training"))  # type: ignore[arg-type]
        note_presence(presence, "pi-3", b"")  # type: ignore[arg-type]
    assert presence.seen == [("pi-3", True), ("pi-3", True), ("pi-3", False)]
    assert logs == [
        {"event": "node.error", "node_id": "pi-3", "round": 4, "detail": why,
         "log_level": "warning"}
    ]  # fmt: skip
