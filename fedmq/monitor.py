"""``fedmq monitor``: watch a federation's status and metrics topics live.

The view is built only from what any monitoring script can read (docs/PROTOCOL.md):
retained node and server status, and per-round metrics.
"""

import dataclasses
import json
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from fedmq import mqtt as edge
from schemas import (
    NodeStatus,
    RoundMetrics,
    SchemaError,
    ServerStatus,
    Topics,
    decode_metrics,
    decode_server_status,
    decode_status,
)

log = structlog.get_logger()


@dataclass
class FleetView:
    """What the monitor knows, updated one message at a time."""

    topics: Topics
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    server: ServerStatus | None = None
    rounds: list[RoundMetrics] = field(default_factory=list)
    invalid: Counter[str] = field(default_factory=Counter)

    def update(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Fold one message in; return it as a JSON-ready dict (None for a cleared topic)."""
        if not payload:
            return None
        try:
            message: NodeStatus | ServerStatus | RoundMetrics
            if topic == self.topics.metrics:
                message = decode_metrics(payload)
                self.rounds.append(message)
            elif topic == self.topics.server:
                message = decode_server_status(payload)
                self.server = message
            else:
                message = decode_status(payload)
                self.nodes[message.node_id] = message
        except SchemaError as error:
            self.invalid[error.reason] += 1
            return {
                "topic": topic,
                "type": "invalid",
                "reason": error.reason,
                "detail": error.detail,
            }
        row = dataclasses.asdict(message)
        extra = row.pop("extra", {})
        return {"topic": topic, "type": _KIND[type(message)], **row, **extra}

    @property
    def finished(self) -> bool:
        """The server said done and the metrics of its last round have arrived."""
        return (
            self.server is not None
            and self.server.state == "done"
            and any(m.round == self.server.round - 1 for m in self.rounds)
        )

    def render(self, now: float) -> str:
        lines = [f"fedmq federation {self.topics.federation!r}"]
        if self.server is not None:
            s = self.server
            lines.append(
                f"server: {s.state}  round {s.round}  reported {s.reported}/{s.expected_nodes}"
                f" (quorum {s.min_nodes})"
            )
        states = Counter(n.state for n in self.nodes.values())
        lines.append(
            f"nodes: {len(self.nodes)}  "
            + "  ".join(f"{state} {count}" for state, count in sorted(states.items()))
        )
        cells = []
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            age = f"{now - node.at:.0f}s" if node.at else "-"
            cells.append(f"{node_id[:14]:<14} {node.state:<9} r{node.round or '-':<4} {age:>5}")
        for start in range(0, len(cells), 3):
            lines.append("  " + " | ".join(cells[start : start + 3]))
        lines.append("round  accuracy   loss   nodes  uplink B  downlink B   seconds  rejected")
        lines.extend(round_line(m) for m in self.rounds[-10:])
        if self.invalid:
            lines.append(f"unreadable messages: {dict(self.invalid)}")
        return "\n".join(lines)


def round_line(m: RoundMetrics) -> str:
    """One row of the rounds table."""
    acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
    loss = f"{m.loss:.4f}" if m.loss is not None else "-"
    rejected = ",".join(f"{k}:{v}" for k, v in m.rejected.items()) or "-"
    return (
        f"{m.round:>5}  {acc:>8} {loss:>7} {len(m.participants):>6} {m.uplink_bytes:>9}"
        f" {m.downlink_bytes:>11} {m.seconds:>9.4f}  {rejected}"
    )


_KIND = {NodeStatus: "status", ServerStatus: "server", RoundMetrics: "metrics"}


def run(
    broker: edge.BrokerAddress,
    federation: str,
    stop: threading.Event,
    *,
    as_json: bool = False,
    until_done: bool = False,
    timeout: float | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the fleet until ``stop``, the timeout, or (with ``until_done``) the last round."""
    topics = Topics(federation)
    inbox: queue.Queue[edge.Received] = queue.Queue()
    client = edge.make_client(
        edge.make_client_id(federation, "monitor", edge.unique_suffix()),
        subscriptions=[(topics.all_status, 1), (topics.server, 1), (topics.metrics, 1)],
        inbox=inbox,
    )
    view = FleetView(topics)
    edge.start(client, broker)
    deadline = None if timeout is None else time.monotonic() + timeout
    live = not as_json and out.isatty()
    last_draw = 0.0
    try:
        while not stop.is_set() and not (until_done and view.finished):
            if deadline is not None and time.monotonic() > deadline:
                log.warning("monitor.timeout", seconds=timeout)
                return 1
            try:
                received = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            row = view.update(received.topic, received.payload)
            if row is None:
                continue
            if as_json:
                out.write(json.dumps(row) + "\n")
                out.flush()
            elif live and time.monotonic() - last_draw > 0.1:
                out.write("\x1b[H\x1b[2J" + view.render(time.time()) + "\n")
                out.flush()
                last_draw = time.monotonic()
            elif not live and row["type"] == "metrics":
                out.write(round_line(view.rounds[-1]) + "\n")
                out.flush()
        if live:
            out.write("\x1b[H\x1b[2J" + view.render(time.time()) + "\n")
        return 0
    finally:
        edge.stop(client)
