"""The trained model out of a real run: ``fedmq aggregator --save-model`` keeps the newest
global model in a file, ``fedmq export`` writes it from the state directory, and
``fedmq.load_params`` gives it back on the task's own tree."""

import json

import numpy as np
import pytest

import fedmq
from fedmq import cli
from fedmq.model_file import read_model
from fedmq.tasks.builtin import mlp_task

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
def test_save_model_keeps_the_last_round_model(mosquitto, federation, spawn, tmp_path, suffix):
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report, saved, state = tmp_path / "report.json", tmp_path / f"model{suffix}", tmp_path / "agg"
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--nodes", "2", "--rounds", "3",
        "--report", str(report), "--save-model", str(saved), "--state-dir", str(state),
    )  # fmt: skip
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--demo-shard", f"{i}/2",
              "--state-dir", str(tmp_path / f"node-{i}"), "--exit-when-done")
        for i in (1, 2)
    ]  # fmt: skip
    assert aggregator.wait(120) == 0, aggregator.log()
    for node in nodes:
        assert node.wait(60) == 0, node.log()

    rounds = json.loads(report.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    model = read_model(saved)
    assert model.model_id == rounds[-1]["model_id"]
    assert model.round == 4 and model.task == "digits-mlp"  # the final model opens "round 4"
    if suffix == ".msgpack":
        assert fedmq.decode_global(saved.read_bytes()).final
    assert not list(tmp_path.glob("*.tmp"))

    # the same model from the state directory (an .npz's zip entries carry a time stamp)
    exported = tmp_path / f"exported{suffix}"
    assert cli.main(["export", "--state-dir", str(state), "--out", str(exported)]) == 0
    again = read_model(exported)
    assert again.model_id == model.model_id and list(again.tensors) == list(model.tensors)
    params = fedmq.load_params(saved, mlp_task("digits-mlp"))
    assert np.array_equal(params.layers[0].w, model.tensors["l0.w"])
