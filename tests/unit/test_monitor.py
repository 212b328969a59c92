"""``fedmq monitor``'s view: pure functions from state to lines, tested without a terminal."""

import io
import json
import random

import pytest

from fedmq.monitor import FleetView, _plain, age, human_bytes, render_lines, sparkline
from fedmq.schemas import NodeStatus, RoundMetrics, ServerStatus, Topics, encode

NOW = 1_800_000_000.0
FED = "pi-fleet"
TOPICS = Topics(FED)


def metrics(round_: int, **changes: object) -> RoundMetrics:
    fields: dict[str, object] = dict(
        federation=FED, round=round_, model_id="0" * 32,
        participants=[f"pi-{i:03d}" for i in range(48)], num_examples=7200,
        accuracy=0.5 + round_ / 100, loss=2.0 / round_, train_loss=1.0,
        uplink_bytes=48 * 9971, downlink_bytes=48 * 8200, global_bytes=9981, rejected={},
        seconds=4.5, aggregate_seconds=0.01, closed_by="all_reported", at=NOW,
    )  # fmt: skip
    fields.update(changes)
    return RoundMetrics(**fields)  # type: ignore[arg-type]


def server(**changes: object) -> ServerStatus:
    fields: dict[str, object] = dict(
        federation=FED, state="waiting", round=13, expected_nodes=50, min_nodes=40,
        reported=37, deadline_seconds=30.0, at=NOW - 1,
    )  # fmt: skip
    fields.update(changes)
    return ServerStatus(**fields)  # type: ignore[arg-type]


STATES = ["submitted"] * 37 + ["training"] * 40 + ["idle"] * 10 + ["offline"] * 8 + ["error"] * 2


def fleet(nodes: int = 100, rounds: int = 30, id_format: str = "pi-{:03d}") -> FleetView:
    rng = random.Random(0)
    view = FleetView(TOPICS)
    for i in range(nodes):
        state = STATES[i % len(STATES)] if i < nodes - 3 else "online"
        node_id = id_format.format(i)
        status = NodeStatus(
            federation=FED, node_id=node_id, state=state, round=12, num_examples=150,
            at=None if state == "offline" else NOW - rng.uniform(0, 5000),
        )  # fmt: skip
        view.update(TOPICS.status(node_id), encode(status), now=NOW - 5, retained=True)
    for r in range(1, rounds + 1):
        rejected = {"wrong_round": 2, "duplicate": 1} if r % 4 == 0 else {}
        dropped = 3 if r == 7 else 0
        view.update(TOPICS.metrics, encode(metrics(r, rejected=rejected, broker_dropped=dropped)))
    view.update(TOPICS.server, encode(server(reported=0, at=NOW - 26.8)), now=NOW)
    view.update(TOPICS.server, encode(server()), now=NOW)
    return view


@pytest.mark.parametrize("height", [12, 24, 40, 60])
@pytest.mark.parametrize("width", [60, 80, 100])
def test_a_hundred_nodes_fit_the_screen(width, height):
    lines = render_lines(fleet(100), NOW, width=width, height=height)
    assert len(lines) <= height
    assert all(len(line) <= width for line in lines), max(lines, key=len)


def test_a_thousand_nodes_with_long_ids_stay_bounded():
    view = fleet(1000, rounds=500, id_format="raspberry-pi-in-the-greenhouse-{:04d}")
    lines = render_lines(view, NOW, width=100, height=40)
    assert len(lines) <= 40
    assert all(len(line) <= 100 for line in lines)
    assert any(line.startswith("... ") and "more:" in line for line in lines)


def test_the_view_shows_what_the_issue_asks_for():
    lines = render_lines(fleet(100), NOW, width=100, height=60)
    text = "\n".join(lines)
    assert "federation pi-fleet" in lines[0]
    assert "round 13" in text
    assert "reported 37/50 (min 40)" in text
    assert "deadline in 3.2 s" in text
    assert "nodes 100: offline 8  error 2  training 40  online 3  submitted 37  idle 10" in text
    # problems first, in capitals; unknown age of a retained will shows as ?
    grid = [line for line in lines if line.startswith("pi-")]
    assert grid[0].split()[1] == "OFFLINE" and grid[0].split()[2] == "?"
    assert "ERROR" in grid[2]
    assert len(grid) == 25  # all 100 nodes, four to a line at 100 columns
    assert "accuracy" in text and "loss" in text and "▁" in text and "█" in text
    assert "rejected 21 in 30 rounds: wrong_round 14, duplicate 7" in text
    assert "BROKER DROPPED 3 messages (r7: 3)" in text
    assert "467.4 KiB" in text  # bytes per round


def test_metrics_republished_after_a_restart_count_once():
    view = FleetView(TOPICS)
    first = view.update(TOPICS.metrics, encode(metrics(1, rejected={"duplicate": 1})))
    again = view.update(TOPICS.metrics, encode(metrics(1, rejected={"duplicate": 2})))
    assert first is not None and first["repeat"] is False
    assert again is not None and again["repeat"] is True
    assert [m.round for m in view.rounds] == [1]
    assert view.rounds[0].rejected == {"duplicate": 2}  # the last one received


def test_deadline_when_the_round_opened_before_the_monitor():
    view = FleetView(TOPICS)
    view.update(TOPICS.server, encode(server(reported=12)), now=NOW)
    assert "deadline 30 s after opening" in "\n".join(render_lines(view, NOW))
    view.update(TOPICS.server, encode(server(round=14, reported=0, at=NOW)), now=NOW)
    assert "deadline in 25.0 s" in "\n".join(render_lines(view, NOW + 5))
    assert "waiting for the quorum" in "\n".join(render_lines(view, NOW + 40))


def test_a_cleared_status_removes_the_node_and_garbage_is_counted():
    view = fleet(3, rounds=0)
    assert view.update(TOPICS.status("pi-000"), b"") is None
    assert "pi-000" not in view.nodes
    row = view.update(TOPICS.status("pi-001"), b"\x93junk")
    assert row is not None and row["type"] == "invalid"
    assert "unreadable messages: malformed 1" in "\n".join(render_lines(view, NOW))
    assert view.update("$fedmq/connected", b"x") is None


def test_empty_view_renders():
    lines = render_lines(FleetView(TOPICS), NOW, width=80, height=20)
    assert "not heard from yet" in "\n".join(lines)
    assert "no metrics yet" in lines[-1]


def test_json_rows_keep_the_message_fields():
    view = FleetView(TOPICS)
    row = view.update(TOPICS.metrics, encode(metrics(3)))
    assert row is not None
    json.dumps(row)
    assert row["type"] == "metrics" and row["round"] == 3 and row["topic"] == TOPICS.metrics
    assert {"accuracy", "loss", "uplink_bytes", "rejected", "broker_dropped"} <= set(row)


def test_plain_output_is_one_line_per_round_and_server_change():
    view = FleetView(TOPICS)
    out = io.StringIO()
    for payload, topic in [
        (encode(server(reported=0)), TOPICS.server),
        (encode(server(reported=3)), TOPICS.server),
        (encode(metrics(1)), TOPICS.metrics),
        (encode(metrics(1)), TOPICS.metrics),
    ]:
        row = view.update(topic, payload, now=NOW)
        assert row is not None
        last = None if row["type"] != "server" or out.getvalue() == "" else ("waiting", 13)
        _plain(view, row, last, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("server waiting round 13")
    assert len(lines) == 2 and lines[1].split()[0] == "1"


def test_small_helpers():
    assert [age(s) for s in (None, -3, 0, 59.9, 60, 3599, 3600, 86400 * 3)] == [
        "?", "0s", "0s", "59s", "1m", "59m", "1h", "3d",
    ]  # fmt: skip
    assert human_bytes(512) == "512 B" and human_bytes(9971) == "9.7 KiB"
    assert sparkline([0.1, None, 0.5, 0.9], 10) == "▁ ▅█"
    assert sparkline([None], 10) == "" and sparkline([1.0, 1.0], 1) == "▁"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_only_subscribes_uses_the_given_broker_and_redraws_in_place(monkeypatch):
    import re
    import threading

    from fedmq import monitor
    from fedmq.mqtt import BrokerAddress, Credentials, Received

    made: dict = {}

    class ReadOnlyClient:
        def publish(self, *_args, **_kwargs):
            raise AssertionError("the monitor must never publish")

    def make_client(client_id, **kwargs):
        made.update(kwargs, client_id=client_id)
        for topic, payload in [
            (TOPICS.status("pi-001"), encode(NodeStatus(FED, "pi-001", "done", 1, at=NOW))),
            (TOPICS.metrics, encode(metrics(1))),
            (TOPICS.server, encode(server(state="done", round=2, reported=0))),
        ]:
            kwargs["inbox"].put(Received(topic, payload, retain=topic != TOPICS.metrics))
        return ReadOnlyClient()

    started = []
    monkeypatch.setattr(monitor.edge, "make_client", make_client)
    monkeypatch.setattr(monitor.edge, "start", lambda _client, broker: started.append(broker))
    monkeypatch.setattr(monitor.edge, "stop", lambda _client: None)
    broker = BrokerAddress("10.0.0.1", 8883, Credentials(username="monitor"))
    out = FakeTTY()
    settings = monitor.MonitorSettings(broker=broker, federation=FED, until_done=True, timeout=10)
    code = monitor.run(settings, threading.Event(), out=out, size=(100, 30))
    assert code == 0
    assert made.get("will") is None and not made.get("persistent")
    assert sorted(t for t, _ in made["subscriptions"]) == sorted(
        [TOPICS.all_status, TOPICS.server, TOPICS.metrics]
    )
    assert made["client_id"].startswith(f"fedmq:{FED}:monitor:")
    assert started == [broker] and started[0].credentials.username == "monitor"
    screen = out.getvalue()
    assert screen.startswith("\x1b[?25l") and screen.endswith("\x1b[?25h")  # cursor back
    frames = [f for f in screen.split("\x1b[H") if f.strip()]
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frames[-1]).splitlines()
    assert len(last) <= 29 and all(len(line) <= 99 for line in last)
    assert "server done after round 1" in "\n".join(last)


def node_status(node_id: str, state: str, **changes: object) -> NodeStatus:
    fields: dict[str, object] = dict(
        federation=FED, node_id=node_id, state=state, round=3, num_examples=150, at=NOW - 2
    )
    fields.update(changes)
    return NodeStatus(**fields)  # type: ignore[arg-type]


def test_the_topic_names_the_node_not_the_payload():
    # issue 11: pi-02, publishing on its own topic with other ids in the payload, showed
    # 41 offline nodes and overwrote pi-01's entry
    view = FleetView(TOPICS)
    view.update(TOPICS.status("pi-01"), encode(node_status("pi-01", "training")), now=NOW)
    rows = [
        view.update(TOPICS.status("pi-02"), encode(node_status(f"pi-{i:02d}", "offline")), now=NOW)
        for i in range(1, 42)
    ]
    assert sorted(view.nodes) == ["pi-01", "pi-02"]
    assert view.nodes["pi-01"].state == "training"
    assert view.nodes["pi-02"].state == "offline"
    last = rows[-1]
    assert last is not None and last["node_id"] == "pi-02" and last["payload_node_id"] == "pi-41"
    text = "\n".join(render_lines(view, NOW, width=100, height=30))
    assert "nodes 2:" in text
    assert "pi-02 says it is pi-41" in text
    # a status that agrees with its topic again clears the mismatch
    row = view.update(TOPICS.status("pi-02"), encode(node_status("pi-02", "online")), now=NOW)
    assert row is not None and "payload_node_id" not in row
    assert "says it is" not in "\n".join(render_lines(view, NOW, width=100, height=30))


def test_plain_output_names_a_status_whose_payload_names_another_node():
    view = FleetView(TOPICS)
    out = io.StringIO()
    row = view.update(TOPICS.status("pi-02"), encode(node_status("pi-01", "offline")), now=NOW)
    assert row is not None
    _plain(view, row, None, out)
    assert out.getvalue() == f"status on {TOPICS.status('pi-02')} names node pi-01\n"


def test_done_shows_the_rounds_run_not_the_final_globals_round():
    # issue 11: a 15-round run showed "server done round 16": the final global and the
    # done status carry R+1 (PROTOCOL 4.3), the last round that ran is R
    view = FleetView(TOPICS)
    out = io.StringIO()
    done = server(state="done", round=16, reported=0, expected_nodes=2, min_nodes=2)
    row = view.update(TOPICS.server, encode(done), now=NOW)
    assert row is not None
    _plain(view, row, None, out)
    assert out.getvalue() == "server done after round 15\n"
    header = render_lines(view, NOW, width=100, height=20)[1]
    assert header.startswith("server done after round 15")
    assert "16" not in header


def test_done_with_a_count_shows_the_final_models_delivery():
    # issue 16: the server's done carries what the nodes received of the final model
    view = FleetView(TOPICS)
    out = io.StringIO()
    done = server(state="done", round=16, reported=0, expected_nodes=2, min_nodes=2,
                  final_downlink_delivered=30_890, final_downlink_nodes=2)  # fmt: skip
    row = view.update(TOPICS.server, encode(done), now=NOW)
    assert row is not None and row["final_downlink_delivered"] == 30_890
    _plain(view, row, None, out)
    text = "final model delivered 30,890 B (2 nodes' counts)"
    assert out.getvalue() == f"server done after round 15\n{text}\n"
    assert render_lines(view, NOW, width=100, height=20)[2] == text


def test_a_nodes_reason_is_shown_beside_the_grid():
    # issue 11: a node that stops on an error or diverges says why in its status
    # `detail`; the terminal view (not only --json) must show it
    view = FleetView(TOPICS)
    why = "stopped on an error: data has 64 features, the model expects 8"
    view.update(TOPICS.status("pi-01"), encode(node_status("pi-01", "training")), now=NOW)
    view.update(
        TOPICS.status("pi-02"), encode(node_status("pi-02", "offline", detail=why)), now=NOW
    )
    text = "\n".join(render_lines(view, NOW, width=100, height=30))
    assert f"pi-02: {why}" in text
    out = io.StringIO()
    row = view.update(
        TOPICS.status("pi-03"), encode(node_status("pi-03", "error", detail="x")), now=NOW
    )
    assert row is not None
    _plain(view, row, None, out)
    assert out.getvalue() == "pi-03 error: x\n"


def test_reasons_of_a_thousand_nodes_stay_bounded():
    view = fleet(1000, rounds=30)
    for i in range(0, 1000, 3):
        node_id = f"pi-{i:03d}"
        status = node_status(node_id, "offline", detail="stopped on an error: " + "x" * 300)
        view.update(TOPICS.status(node_id), encode(status), now=NOW)
    for height in (12, 40):  # 12: no room beside the rounds table, still bounded
        lines = render_lines(view, NOW, width=80, height=height)
        assert len(lines) <= height and all(len(line) <= 80 for line in lines)
    assert sum(line.startswith("pi-000: stopped on an error") for line in lines) == 1
    assert any(line.startswith("... 332 more nodes say why") for line in lines)


def test_the_last_rounds_federated_metrics_are_shown_and_kept_in_json_rows():
    from fedmq.schemas import RoundEvaluation

    view = FleetView(TOPICS)
    view.update(TOPICS.metrics, encode(metrics(1)))
    assert "federated" not in "\n".join(render_lines(view, NOW, width=120, height=40))
    parts = RoundEvaluation(central={"accuracy": 0.5}, federated={"loss": 0.5, "accuracy": 0.75})
    row = view.update(TOPICS.metrics, encode(metrics(2, metrics=parts)))
    assert row is not None and json.loads(json.dumps(row))["metrics"]["federated"]["loss"] == 0.5
    text = "\n".join(render_lines(view, NOW, width=120, height=40))
    assert "federated (round 2's starting model): loss 0.5000  accuracy 0.7500" in text
