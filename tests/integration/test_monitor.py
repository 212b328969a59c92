"""``fedmq monitor`` (JSON and plain lines) and examples/monitor_metrics.py against a real
federation whose aggregator is restarted mid-run, so the last closed round's metrics
arrive twice: every round is seen, and each is shown once."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.schemas import Topics, decode_metrics

from ..conftest import through, wait_until

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monitor_metrics.py"
ROUNDS = 12  # rounds close in ~15 ms: enough that the restart lands mid-run


def test_monitors_see_every_round_once_across_an_aggregator_restart(
    mosquitto, federation, spawn, node_data, collect, tmp_path
):
    topics = Topics(federation)
    wire = collect([topics.metrics])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    watch = ["--until-done", "--timeout", "180"]
    as_json = spawn("monitor-json", "monitor", *common, "--json", *watch)
    plain = spawn("monitor-plain", "monitor", *common, *watch)  # stdout is a file: plain lines
    example_log = tmp_path / "example.log"
    with example_log.open("wb") as out:
        example = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "127.0.0.1", str(mosquitto.port), federation],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        aggregator_args = ["aggregator", *common, "--nodes", "3", "--rounds", str(ROUNDS)]
        first = spawn("aggregator-1", *aggregator_args)
        nodes = [
            spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
                  "--state-dir", str(tmp_path / f"state-{i}"), "--exit-when-done")
            for i, path in enumerate(node_data(3))
        ]  # fmt: skip
        wait_until(lambda: len(wire.on(topics.metrics)) >= 1, 120, "round 1's metrics", 0.002)
        # Hold pi-2 so that no further round can close (every round waits for all three):
        # with 4 rounds and no hold, the run could finish within wait_until's 50 ms poll (now 2),
        # before the SIGTERM landed; the monitors (--until-done) then left at the first
        # "done", and the resumed aggregator's copy of the last metrics reached only the
        # wire collector (CI, 2026-12-05).
        nodes[2].proc.send_signal(signal.SIGSTOP)
        try:
            first.proc.send_signal(signal.SIGTERM)  # resumes from .fedmq-aggregator in tmp_path
            first.wait(30)  # a clean stop on SIGTERM: exit status 0
            second = spawn("aggregator-2", *aggregator_args)
        finally:
            nodes[2].proc.send_signal(signal.SIGCONT)
        assert second.wait(180) == 0, second.log()[-3000:]
        for node in nodes:
            assert node.wait(60) == 0, node.log()[-3000:]
        assert as_json.wait(60) == 0, as_json.log()[-3000:]
        assert plain.wait(60) == 0, plain.log()[-3000:]
        # those exits say the broker had every message; the example's copies may still be
        # on their way (mosquitto delivers to each subscriber on its own)
        last = f"round {ROUNDS} "
        wait_until(lambda: last in example_log.read_text(), 10, "the example's last round")
    finally:
        example.terminate()
        example.wait(10)

    rows = [json.loads(line) for line in as_json.log().splitlines() if line.startswith("{")]
    metrics = [row for row in rows if row["type"] == "metrics"]

    def as_many(payloads: list[bytes]) -> bool:  # as many as the monitor got, every round
        return len(payloads) >= len(metrics) and through(ROUNDS)(payloads)

    on_wire = [decode_metrics(p).round for p in wire.wait_on(topics.metrics, as_many, "metrics")]
    assert sorted(set(on_wire)) == list(range(1, ROUNDS + 1))
    assert len(on_wire) > ROUNDS, on_wire  # the resumed aggregator republished a round's metrics

    assert [m["round"] for m in metrics if not m["repeat"]] == list(range(1, ROUNDS + 1))
    assert len(metrics) == len(on_wire)  # --json passes every message on, copies marked
    assert all(m["participants"] == ["pi-0", "pi-1", "pi-2"] for m in metrics)
    assert all("received_at" in row for row in rows)
    assert {row["type"] for row in rows} >= {"status", "server", "metrics"}

    lines = plain.log().splitlines()
    round_lines = [line for line in lines if line[:5].strip().isdigit()]
    assert [int(line.split()[0]) for line in round_lines] == list(range(1, ROUNDS + 1))
    assert all("nodes " in line for line in round_lines)
    assert f"server done after round {ROUNDS}" in lines

    printed = example_log.read_text().splitlines()
    shown = [int(line.split()[1]) for line in printed if line.startswith("round ")]
    assert shown == list(range(1, ROUNDS + 1))
