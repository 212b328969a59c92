"""examples/: a node bringing its own data (.npz) and model (an ``mlp:`` spec), as
examples/README.md shows it, against a real mosquitto; and the model spec itself."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.models import MLP, MODELS, check_layout, get_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.integration
def test_own_data_and_own_model_federation(mosquitto, federation, spawn, tmp_path):
    made = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_node_data.py"), "synthetic", str(tmp_path / "data"),
         "--nodes", "3", "--features", "8", "--classes", "3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "use --model mlp:8-32-3" in made.stdout
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report = tmp_path / "report.json"
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--model", "mlp:8-32-3", "--nodes", "3",
        "--rounds", "4", "--test-data", str(tmp_path / "data" / "test.npz"),
        "--report", str(report), "--fresh",
    )  # fmt: skip
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}",
              "--data", str(tmp_path / "data" / f"node-{i}.npz"),
              "--state-dir", str(tmp_path / "state" / f"pi-{i}"), "--exit-when-done")
        for i in (1, 2, 3)
    ]  # fmt: skip
    assert aggregator.wait(180) == 0, aggregator.log()[-3000:]
    for node in nodes:
        assert node.wait(60) == 0, node.log()[-3000:]
    written = json.loads(report.read_text())
    assert written["model"] == "mlp:8-32-3"
    rounds = written["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["participants"] == 3 and r["rejected"] == {} for r in rounds)
    assert rounds[-1]["accuracy"] > 0.6  # separable blobs: far above chance (1/3)
    # and the run can be looked at as the README says
    chart = tmp_path / "accuracy.png"
    shown = subprocess.run(
        [sys.executable, "-m", "fedmq", "report", str(report), "--plot", str(chart)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "4 rounds" in shown.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


def test_make_node_data_from_csv(tmp_path):
    from fedmq.datasets import load_npz

    csv = tmp_path / "readings.csv"
    csv.write_text("temp,humidity,label\n21.5,40,0\n30.1,80,2\n25,60,1\n")
    out = tmp_path / "node.npz"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_node_data.py"), "csv", str(csv), str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = load_npz(out)
    assert data.x.shape == (3, 2) and data.y.tolist() == [0, 2, 1]
    csv.write_text("a,label\n1,0.5\n")
    bad = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_node_data.py"), "csv", str(csv), str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "whole-number class ids" in bad.stderr


def test_monitor_example_stays_small_and_plain():
    source = (EXAMPLES / "monitor_metrics.py").read_text()
    assert len(source.splitlines()) < 40
    imports = {line.split()[1] for line in source.splitlines() if line.startswith("import ")}
    assert imports == {"sys", "msgpack", "paho.mqtt.client"}


def test_a_model_spec_names_an_mlp():
    model = get_model("mlp:8-32-3")
    assert model == MLP((8, 32, 3))
    assert check_layout("mlp:8-32-3", model.layout) == model
    assert get_model("mlp:64-32-10") == MODELS["digits-mlp"]  # the same network
    assert get_model("digits-mlp") is MODELS["digits-mlp"]  # names keep working
    params = get_model("mlp:4-5-6-3").init(0)
    logits = get_model("mlp:4-5-6-3").logits(params, np.ones((2, 4), np.float32))
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match="does not match"):
        check_layout("mlp:8-16-3", model.layout)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mlp:", "layer sizes >= 1"),
        ("mlp:8", "give 2 to 17 layer sizes"),
        ("mlp:8-0-3", "layer sizes >= 1"),
        ("mlp:08-3", "layer sizes >= 1"),
        ("mlp:8--3", "layer sizes >= 1"),
        ("mlp:8-x-3", "layer sizes >= 1"),
        ("mlp:8-³-3", "layer sizes >= 1"),
        ("mlp:" + "-".join(["4"] * 19), "give 2 to 17"),
        ("mlp:8-70000-3", "too large"),
        ("mlp:4000-4000-4000-3", "too large"),
        ("resnet", "known: digits-mlp, digits-mlp-large, or your own as mlp:"),
    ],
)
def test_bad_model_specs_say_why(spec, message):
    with pytest.raises(ValueError, match=message):
        get_model(spec)
