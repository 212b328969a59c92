"""FedProx end to end: `fedmq demo --proximal-mu` through a real mosquitto (the demo's)."""

import json
import subprocess
import sys

import pytest

from fedmq.schemas import GlobalModel, decode_global

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _demo(tmp_path, name: str, *extra: str) -> tuple[dict, GlobalModel]:
    report, model = tmp_path / f"{name}.json", tmp_path / f"{name}.msgpack"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "3", "--rounds", "3", "--seed", "0",
         "--report", str(report), "--save-model", str(model), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(report.read_text()), decode_global(model.read_bytes())


def test_the_demo_trains_with_the_proximal_term_it_announces(tmp_path):
    prox, prox_model = _demo(tmp_path, "prox", "--proximal-mu", "0.1")
    plain, plain_model = _demo(tmp_path, "plain")
    assert prox["proximal_mu"] == 0.1 and "proximal_mu" not in plain
    assert [len(r["participant_ids"]) for r in prox["rounds"]] == [3, 3, 3]
    assert prox_model.plan.proximal_mu == 0.1 and plain_model.plan.proximal_mu == 0.0
    # the nodes trained another objective: every round's model differs from plain FedAvg's
    for with_term, without in zip(prox["rounds"], plain["rounds"], strict=True):
        assert with_term["model_id"] != without["model_id"]
    assert prox["final_accuracy"] > 0.5
