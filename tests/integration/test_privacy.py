"""DP-SGD end to end: `fedmq demo --dp-sgd` through a real mosquitto (the demo's)."""

import itertools
import json
import subprocess
import sys

import pytest

from fedmq.schemas import decode_global

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_demo_trains_with_dp_and_the_epsilon_spent_grows_every_round(tmp_path):
    report, model = tmp_path / "dp.json", tmp_path / "dp.msgpack"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "3", "--rounds", "4", "--seed", "0",
         "--dp-sgd", "noise=1.0,clip=1.0", "--report", str(report), "--save-model", str(model)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(report.read_text())
    assert run["dp_sgd"] == "noise=1.0,clip=1.0"
    assert decode_global(model.read_bytes()).plan.dp_sgd is not None
    rows = run["rounds"]
    assert [len(r["participant_ids"]) for r in rows] == [3, 3, 3, 3]
    assert all(r["rejected"] == {} and r["train_loss"] is None for r in rows)
    spent = [r["dp_epsilon_max"] for r in rows]
    assert spent[0] > 0 and all(b > a for a, b in itertools.pairwise(spent)), spent


def test_the_demo_runs_dp_fedavg_and_its_epsilon_grows_every_round(tmp_path):
    report = tmp_path / "dpf.json"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "3", "--rounds", "3", "--seed", "0",
         "--dp-fedavg", "noise=1.0,clip=1.0", "--report", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(report.read_text())
    assert run["dp_fedavg"] == "noise=1.0,clip=1.0"
    spent = [r["dp_fedavg_epsilon"] for r in run["rounds"]]
    assert len(spent) == 3 and spent[0] > 0
    assert all(b > a for a, b in itertools.pairwise(spent)), spent
