"""``fedmq monitor``: watch a federation's status, server and metrics topics live.

The view is built only from what any monitoring script can read (docs/PROTOCOL.md):
retained node and server status, and per-round metrics. Three layers:

- ``FleetView``: the state, folded one message at a time (no I/O, no clock: the time of
  receipt is passed in);
- ``render_lines(view, now, width=, height=)``: a pure function from state to screen
  lines, each at most ``width`` columns and at most ``height`` of them, whatever the
  fleet's size (offline and failed nodes first; the rest summarised when they do not fit);
- ``run``: the MQTT client (subscribe only: no publish, no will, so a read-only identity
  suffices) and the terminal: redrawn in place on a TTY, plain lines otherwise, or one
  JSON object per message with ``json``.
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
from fedmq.monitor_settings import MonitorSettings
from fedmq.schemas import (
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

# Problems first, then work in progress, then the quiet states.
STATE_ORDER = ("offline", "error", "training", "online", "submitted", "idle", "done")
_SPARKS = "▁▂▃▄▅▆▇█"


@dataclass
class FleetView:
    """What the monitor knows, updated one message at a time."""

    topics: Topics
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    # when each node was last heard of: its status's ``at``, else the time of receipt of a
    # live message; None for a retained will (we cannot know how old it is)
    seen: dict[str, float | None] = field(default_factory=dict)
    server: ServerStatus | None = None
    round_opened_at: float | None = None  # of the server's open round, if we saw it open
    by_round: dict[int, RoundMetrics] = field(default_factory=dict)
    invalid: Counter[str] = field(default_factory=Counter)
    # node id of the topic -> the other node id its last status payload named: the topic
    # wins (the broker's ACL ties a node's account to its own topic, not to the payload)
    mismatched: dict[str, str] = field(default_factory=dict)

    @property
    def rounds(self) -> list[RoundMetrics]:
        """One metrics message per round (the last received), in round order."""
        return [self.by_round[r] for r in sorted(self.by_round)]

    def update(
        self, topic: str, payload: bytes, *, now: float | None = None, retained: bool = False
    ) -> dict[str, Any] | None:
        """Fold one message in; return it as a JSON-ready dict (None for a cleared topic).

        Metrics rows get ``"repeat": true`` when that round's metrics had already arrived
        (an aggregator republishes them after a reconnect or restart). A status is filed
        under its topic's node id (the broker ties the topic to the publishing account);
        its row's ``node_id`` is that id, and ``payload_node_id`` the other id its payload
        named, if it named another."""
        node_id = self.topics.node_of(topic)
        if not payload:
            if node_id is not None:  # a cleared retained status: the node is gone
                self.nodes.pop(node_id, None)
                self.seen.pop(node_id, None)
                self.mismatched.pop(node_id, None)
            return None
        if topic != self.topics.metrics and topic != self.topics.server and node_id is None:
            return None  # not one of ours (e.g. the edge's connected marker)
        repeat = None
        claimed = None
        try:
            message: NodeStatus | ServerStatus | RoundMetrics
            if topic == self.topics.metrics:
                message = decode_metrics(payload)
                repeat = message.round in self.by_round
                self.by_round[message.round] = message
            elif topic == self.topics.server:
                message = decode_server_status(payload)
                self._server(message)
            else:
                message = decode_status(payload)
                assert node_id is not None  # not metrics nor server: a status topic
                if message.node_id != node_id:
                    claimed = message.node_id
                    message = dataclasses.replace(message, node_id=node_id)
                    self.mismatched[node_id] = claimed
                else:
                    self.mismatched.pop(node_id, None)
                self.nodes[node_id] = message
                self.seen[node_id] = (
                    message.at if message.at is not None else None if retained else now
                )
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
        result = {"topic": topic, "type": _KIND[type(message)], **row, **extra}
        if repeat is not None:
            result["repeat"] = repeat
        if claimed is not None:
            result["payload_node_id"] = claimed
        return result

    def _server(self, status: ServerStatus) -> None:
        previous = self.server
        if status.state == "waiting" and status.reported == 0:
            # the opening message of a round (or the first after a resume): its clock
            if previous is None or previous.round != status.round or previous.state != "waiting":
                self.round_opened_at = status.at
        elif previous is None or previous.round != status.round:
            self.round_opened_at = None  # joined mid-round: the opening time is unknown
        self.server = status

    @property
    def finished(self) -> bool:
        """The server said done and the metrics of its last round have arrived."""
        return (
            self.server is not None
            and self.server.state == "done"
            and (self.server.round - 1) in self.by_round
        )

    def render(self, now: float, *, width: int = 100, height: int = 40) -> str:
        return "\n".join(render_lines(self, now, width=width, height=height))


_KIND = {NodeStatus: "status", ServerStatus: "server", RoundMetrics: "metrics"}


# ------------------------------------------------------------------ pure view building


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, with an ellipsis when cut."""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def age(seconds: float | None) -> str:
    """At most 4 columns: 12s, 5m, 3h, 40d; ? when unknown."""
    if seconds is None:
        return "?"
    s = max(0.0, seconds)
    if s < 60:
        return f"{int(s)}s"
    if s < 3600:
        return f"{int(s // 60)}m"
    if s < 86400:
        return f"{int(s // 3600)}h"
    return f"{min(999, int(s // 86400))}d"


def human_bytes(count: float) -> str:
    """``9.7 KiB``-style, at most 9 columns."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def sparkline(values: list[float | None], width: int) -> str:
    """The last ``width`` values as block characters scaled min..max; a gap for None."""
    shown = values[-width:] if width > 0 else []
    known = [v for v in shown if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low
    out = []
    for v in shown:
        if v is None:
            out.append(" ")
        else:
            level = 0 if span == 0 else round((v - low) / span * (len(_SPARKS) - 1))
            out.append(_SPARKS[level])
    return "".join(out)


def bar(done: int, total: int, width: int) -> str:
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "█" * filled + "░" * (width - filled)


def server_text(status: ServerStatus) -> str:
    """``server waiting round 7``; ``server done after round 15`` for a done status,
    whose ``round`` is that of the final global, one past the last round run."""
    if status.state == "done":
        return f"server done after round {status.round - 1}"
    return f"server {status.state} round {status.round}"


def final_delivery_text(status: ServerStatus) -> str | None:
    """``final model delivered 30,890 B (10 nodes' counts)`` from a ``done`` that carries
    the count (docs/PROTOCOL.md 8.4), else None."""
    if status.final_count is None:
        return None
    delivered, nodes = status.final_count
    return f"final model delivered {delivered or 0:,} B ({nodes} nodes' counts)"


def header_lines(view: FleetView, now: float) -> list[str]:
    lines = [f"fedmq monitor  federation {view.topics.federation}"]
    s = view.server
    if s is None:
        lines.append("server: not heard from yet (no retained server status)")
        return lines
    when = f"  ({age(now - s.at)} ago)" if s.at is not None else ""
    lines.append(f"{server_text(s)}{when}")
    final = final_delivery_text(s)
    if final is not None:
        lines.append(final)
    if s.state == "waiting":
        progress = f"reported {s.reported}/{s.expected_nodes} (min {s.min_nodes})"
        progress += "  " + bar(s.reported, s.expected_nodes, 20)
        if s.deadline_seconds is not None:
            if view.round_opened_at is None:
                progress += f"  deadline {s.deadline_seconds:g} s after opening"
            else:
                left = view.round_opened_at + s.deadline_seconds - now
                if left >= 0:
                    progress += f"  deadline in {left:.1f} s"
                elif s.reported < s.min_nodes:
                    progress += f"  deadline passed {-left:.1f} s ago, waiting for the quorum"
                else:
                    progress += "  deadline passed, closing"
        lines.append(progress)
    return lines


def node_lines(view: FleetView, now: float, *, width: int, max_lines: int) -> list[str]:
    """A count per state, then a grid of nodes: OFFLINE and ERROR first (in capitals, so
    they stand out without colour), then by state and id, each with its last-seen age;
    then up to three nodes' ``detail`` (why one stopped or diverged), in the same order.

    At most ``max_lines`` lines; nodes that do not fit are summarised on the grid's last."""
    counts = Counter(n.state for n in view.nodes.values())
    summary = f"nodes {len(view.nodes)}: " + "  ".join(
        f"{state} {counts[state]}" for state in STATE_ORDER if counts[state]
    )
    lines = [fit(summary, width)]
    if not view.nodes or max_lines < 2:
        return lines[:max_lines]
    rank = {state: i for i, state in enumerate(STATE_ORDER)}
    order = sorted(view.nodes, key=lambda n: (rank.get(view.nodes[n].state, 99), n))
    reasons = reason_lines(view, order, width=width, max_lines=min(3, (max_lines - 1) // 2))
    max_lines -= len(reasons)
    id_width = min(16, max(len(n) for n in order))
    cell_width = id_width + 1 + 9 + 1 + 4  # "<id> submitted 12s"
    per_row = max(1, (width + 2) // (cell_width + 2))
    rows = -(-len(order) // per_row)
    if rows > max_lines - 1:  # keep the last line for what does not fit
        rows = max(0, max_lines - 2)
    shown = order[: rows * per_row]
    for start in range(0, len(shown), per_row):
        cells = []
        for node_id in shown[start : start + per_row]:
            node = view.nodes[node_id]
            seen = view.seen.get(node_id)
            state = node.state.upper() if node.state in ("offline", "error") else node.state
            cell = (
                f"{fit(node_id, id_width):<{id_width}} {state:<9} "
                f"{age(None if seen is None else now - seen):>4}"
            )
            cells.append(cell)
        lines.append("  ".join(cells).rstrip())
    hidden = order[len(shown) :]
    if hidden:
        more = Counter(view.nodes[n].state for n in hidden)
        lines.append(
            f"... {len(hidden)} more: "
            + ", ".join(f"{state} {more[state]}" for state in STATE_ORDER if more[state])
        )
    return [fit(line, width) for line in [*lines, *reasons]]


def reason_lines(view: FleetView, order: list[str], *, width: int, max_lines: int) -> list[str]:
    """``<id>: <detail>`` for nodes whose status says why (at most ``max_lines``, the
    last one counting those left out)."""
    told = [n for n in order if view.nodes[n].detail]
    if max_lines < 1 or not told:
        return []
    if len(told) > max_lines:
        left = len(told) - (max_lines - 1)
        return [
            *(f"{n}: {view.nodes[n].detail}" for n in told[: max_lines - 1]),
            f"... {left} more nodes say why (fedmq monitor --json shows every detail)",
        ]
    return [f"{n}: {view.nodes[n].detail}" for n in told]


ROUND_HEADER = "round  accuracy     loss  nodes     uplink   downlink  seconds  closed    rejected"


def round_line(m: RoundMetrics) -> str:
    """One row of the rounds table (also the plain-output line per round)."""
    acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
    loss = f"{m.loss:.4f}" if m.loss is not None else "-"
    rejected = ",".join(f"{k}:{v}" for k, v in sorted(m.rejected.items())) or "-"
    closed = "all" if m.closed_by == "all_reported" else m.closed_by
    return (
        f"{m.round:>5}  {acc:>8} {loss:>8} {len(m.participants):>6}"
        f" {human_bytes(m.uplink_bytes):>10} {human_bytes(m.downlink_bytes):>10}"
        f" {m.seconds:>8.2f}  {closed:<8}  {rejected}"
    )


def metrics_lines(view: FleetView, *, width: int, table_rows: int) -> list[str]:
    rounds = view.rounds
    lines = [] if rounds else ["rounds: no metrics yet (not retained: the next round shows)"]
    if rounds:
        lines.extend(_round_summary(rounds, width=width, table_rows=table_rows))
    if view.invalid:
        lines.append(
            "unreadable messages: "
            + ", ".join(f"{reason} {n}" for reason, n in view.invalid.most_common())
        )
    if view.mismatched:
        lines.append(
            "STATUS NAMES ANOTHER NODE (shown under its topic's): "
            + ", ".join(f"{n} says it is {view.mismatched[n]}" for n in sorted(view.mismatched))
        )
    return [fit(line, width) for line in lines]


def _round_summary(rounds: list[RoundMetrics], *, width: int, table_rows: int) -> list[str]:
    lines = []
    spark_width = max(0, width - 34)
    last = rounds[-1]
    for label, values in (
        ("accuracy", [m.accuracy for m in rounds]),
        ("loss", [m.loss for m in rounds]),
    ):
        known = [v for v in values if v is not None]
        if not known:
            continue
        best = max(known) if label == "accuracy" else min(known)
        current = values[-1]
        now_text = f"{current:.4f}" if current is not None else "-"
        lines.append(
            f"{label:<8} {now_text:>7} ({'best' if label == 'accuracy' else 'min'} {best:.4f})"
            f"  {sparkline(values, spark_width)}"
        )
    federated = last.metrics.federated if last.metrics is not None else None
    if federated:  # the nodes' held-out examples, on the model the round started from
        each = "  ".join(f"{name} {value:.4f}" for name, value in federated.items())
        lines.append(f"federated (round {last.round}'s starting model): {each}")
    lines.append(
        f"bytes/round up {human_bytes(last.uplink_bytes)}  down {human_bytes(last.downlink_bytes)}"
        f"  (all rounds seen: up {human_bytes(sum(m.uplink_bytes for m in rounds))},"
        f" down {human_bytes(sum(m.downlink_bytes for m in rounds))})"
    )
    lines.append(ROUND_HEADER)
    lines.extend(round_line(m) for m in rounds[-table_rows:] if table_rows > 0)
    rejected: Counter[str] = Counter()
    for m in rounds:
        rejected.update(m.rejected)
    if rejected:
        lines.append(
            f"rejected {sum(rejected.values())} in {len(rounds)} rounds: "
            + ", ".join(f"{reason} {n}" for reason, n in rejected.most_common())
        )
    dropped = {m.round: m.broker_dropped for m in rounds if m.broker_dropped}
    if dropped:
        where = ", ".join(f"r{r}: {n}" for r, n in sorted(dropped.items())[-5:])
        lines.append(
            f"BROKER DROPPED {sum(dropped.values())} messages ({where}): its queues are too small"
        )
    return lines


def render_lines(view: FleetView, now: float, *, width: int = 100, height: int = 40) -> list[str]:
    """The whole screen: at most ``height`` lines of at most ``width`` columns."""
    width = max(40, width)
    height = max(12, height)
    head = [fit(line, width) for line in header_lines(view, now)]
    table_rows = 5
    tail = metrics_lines(view, width=width, table_rows=table_rows)
    while len(head) + len(tail) + 4 > height and table_rows > 1:  # shrink the table first
        table_rows -= 1
        tail = metrics_lines(view, width=width, table_rows=table_rows)
    room = height - len(head) - len(tail) - 2  # two blank separator lines
    nodes = node_lines(view, now, width=width, max_lines=max(1, room))
    lines = [*head, "", *nodes, "", *tail]
    return lines[:height]


# ------------------------------------------------------------------ terminal and MQTT


def _screen(lines: list[str]) -> str:
    """Cursor home, each line clearing its rest, then clear below: no flicker."""
    return "\x1b[H" + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J"


def run(
    settings: MonitorSettings,
    stop: threading.Event,
    *,
    out: TextIO = sys.stdout,
    size: tuple[int, int] | None = None,
) -> int:
    """Show the fleet until ``stop``, the timeout, or (with ``until_done``) the last round.

    Read-only at the broker: the client subscribes and never publishes (no last will
    either), so a monitor identity with read access to ``fedmq/<federation>/#`` suffices.
    ``size``: (columns, lines) of the terminal; asked from the terminal when None.
    """
    import shutil

    federation, timeout, until_done = settings.federation, settings.timeout, settings.until_done
    topics = Topics(federation)
    inbox: queue.Queue[edge.Received] = queue.Queue()
    client = edge.make_client(
        edge.make_client_id(federation, "monitor", edge.unique_suffix()),
        subscriptions=[(topics.all_status, 1), (topics.server, 1), (topics.metrics, 1)],
        inbox=inbox,
    )
    view = FleetView(topics)
    edge.start(client, settings.broker)
    deadline = None if timeout is None else time.monotonic() + timeout
    live = not settings.json and out.isatty()
    last_draw = 0.0
    last_server: tuple[str, int] | None = None

    def draw() -> None:
        columns, rows = size or shutil.get_terminal_size((100, 40))
        out.write(_screen(render_lines(view, time.time(), width=columns - 1, height=rows - 1)))
        out.flush()

    if live:
        out.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear once
        draw()
    try:
        while not stop.is_set() and not (until_done and view.finished):
            edge.check(client)
            if deadline is not None and time.monotonic() > deadline:
                log.warning("monitor.timeout", seconds=timeout)
                return 1
            try:
                received = inbox.get(timeout=0.2)
            except queue.Empty:
                if live and time.monotonic() - last_draw > 1.0:  # ages and deadline tick
                    draw()
                    last_draw = time.monotonic()
                continue
            if received.topic == edge.CONNECTED:
                continue
            row = view.update(
                received.topic, received.payload, now=time.time(), retained=received.retain
            )
            if row is None:
                continue
            if settings.json:
                row["received_at"] = time.time()
                out.write(json.dumps(row) + "\n")
                out.flush()
            elif live:
                if time.monotonic() - last_draw > 0.1:
                    draw()
                    last_draw = time.monotonic()
            else:
                _plain(view, row, last_server, out)
                if view.server is not None:
                    last_server = (view.server.state, view.server.round)
        if live:
            draw()
        return 0
    finally:
        if live:
            out.write("\x1b[?25h")  # the cursor back
            out.flush()
        edge.stop(client)


def _plain(
    view: FleetView, row: dict[str, Any], last_server: tuple[str, int] | None, out: TextIO
) -> None:
    """Not a terminal: a line per new round, and one per change of the server's state."""
    if row["type"] == "metrics" and not row.get("repeat"):
        counts = Counter(n.state for n in view.nodes.values())
        states = " ".join(f"{s}:{counts[s]}" for s in STATE_ORDER if counts[s])
        out.write(f"{round_line(view.by_round[row['round']])}  nodes {states or '-'}\n")
        out.flush()
    elif row["type"] == "server" and view.server is not None:
        s = view.server
        if (s.state, s.round) != last_server:
            if s.state == "done":
                out.write(f"{server_text(s)}\n")
                final = final_delivery_text(s)
                if final is not None:
                    out.write(f"{final}\n")
            else:
                out.write(f"{server_text(s)} expects {s.expected_nodes} (min {s.min_nodes})\n")
            out.flush()
    elif row["type"] == "status" and "payload_node_id" in row:
        out.write(f"status on {row['topic']} names node {row['payload_node_id']}\n")
        out.flush()
    elif row["type"] == "status" and row.get("detail"):
        out.write(f"{row['node_id']} {row['state']}: {row['detail']}\n")
        out.flush()
    elif row["type"] == "invalid":
        out.write(f"unreadable message on {row['topic']}: {row['reason']}\n")
        out.flush()
