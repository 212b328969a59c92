"""A server optimiser through the whole system: `fedmq demo --server-optimizer` starts a
real mosquitto, its nodes and an aggregator that applies FedAdam and checkpoints its state."""

import json
import subprocess
import sys

import msgpack
import pytest

pytestmark = [pytest.mark.integration]


def test_the_demo_runs_fedadam_through_a_real_mosquitto(tmp_path):
    report, workdir = tmp_path / "report.json", tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--server-optimizer", "fedadam:0.01",
         "--nodes", "3", "--rounds", "3", "--report", str(report), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = json.loads(report.read_text())["rounds"]
    assert [row["participants"] for row in rounds] == [3, 3, 3]
    assert len({row["model_id"] for row in rounds}) == 3
    checkpoint = msgpack.unpackb((workdir / "aggregator" / "checkpoint.msgpack").read_bytes())
    assert checkpoint["fingerprint"]["server_optimizer"] == "fedadam:0.01"
    count = checkpoint["server_optimizer_state"][0]  # Adam's step count, then its moments
    assert (count["dtype"], count["shape"]) == ("<i4", [])
    assert int.from_bytes(count["data"], "little") == 3  # one step per closed round
