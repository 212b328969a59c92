"""A node on another task than its aggregator's, through a real mosquitto: it does not
train, says why in one line on its retained status, keeps running (no crash loop) and
sends nothing; started again on the aggregator's task, it trains and the run finishes."""

import json
import time

import pytest

from fedmq.schemas import Topics, decode_metrics, decode_status

from ..conftest import through, wait_until

pytestmark = pytest.mark.integration

# Tasks in files in the children's working directory (MODULE:ATTRIBUTE), alike but for
# their declared version: the built-in small MLP under another name.
VERSIONED = (
    "import dataclasses\n"
    "from fedmq.tasks.builtin import mlp_task\n"
    "task = dataclasses.replace(mlp_task('mlp:64-16-10'), name='digits-small', version={v})\n"
)


@pytest.mark.parametrize(
    ("aggregator_task", "refused_task", "difference"),
    [
        (
            "mlp:64-16-10",
            "mlp:64-32-10",
            "the global model does not match task 'mlp:64-32-10': "
            "task 'mlp:64-16-10' where 'mlp:64-32-10' was expected: give this node the --task "
            "the aggregator runs",
        ),
        (
            "small_v1:task",
            "small_v2:task",
            "the global model does not match task 'digits-small': "
            "task 'digits-small' version '1' where '2' was expected: give this node the --task "
            "the aggregator runs",
        ),
        (
            "small_v1:task",
            None,  # no --task: the global model names a task that is not built in
            "the global model is task 'digits-small', which is not built in: start the node "
            "with --task MODULE:ATTRIBUTE (the same the aggregator runs)",
        ),
    ],
    ids=["other-task", "other-version", "no-task"],
)
def test_a_node_on_another_task_refuses_then_trains_on_the_same(
    mosquitto, federation, spawn, node_data, collect, tmp_path, aggregator_task, refused_task,
    difference,
):  # fmt: skip
    for version in (1, 2):
        (tmp_path / f"small_v{version}.py").write_text(VERSIONED.format(v=version))
    topics = Topics(federation)
    watcher = collect([topics.status("pi-0"), topics.update("pi-0"), topics.metrics])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report = tmp_path / "report.json"
    data = str(node_data(1)[0])
    node_args = [*common, "--node-id", "pi-0", "--data", data,
                 "--state-dir", str(tmp_path / "node"), "--exit-when-done"]  # fmt: skip
    task_args = [] if refused_task is None else ["--task", refused_task]
    refusing = spawn("node-refusing", "node", *node_args, *task_args)

    def statuses():  # type: ignore[no-untyped-def]
        return [decode_status(p) for p in watcher.on(topics.status("pi-0"))]

    # The node first, so that round 1 reaches it live on both global topics (the full
    # model and its copy on the compact topic): it must refuse the model once, not twice.
    wait_until(lambda: "online" in [s.state for s in statuses()], 90, "the node online")
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--task", aggregator_task, "--nodes", "1",
        "--rounds", "1", "--report", str(report), "--state-dir", str(tmp_path / "agg"),
    )  # fmt: skip

    wait_until(lambda: any(s.state == "error" for s in statuses()), 90, "the node's error status")
    errors = [s for s in statuses() if s.state == "error"]
    assert len(errors) == 1
    detail = errors[0].detail or ""
    assert detail == f"cannot build this model: {difference}", detail
    assert "\n" not in detail
    assert errors[0].round == 1
    # It stays up and quiet: no restart, no second error, no training, no update.
    time.sleep(3)
    assert refusing.proc.poll() is None, refusing.log()[-3000:]
    assert [s.state for s in statuses()].count("error") == 1
    assert "training" not in [s.state for s in statuses()]
    assert watcher.on(topics.update("pi-0")) == []
    assert watcher.on(topics.metrics) == []
    refusing.stop()

    # The same node (same id, same state directory) on the aggregator's task trains.
    node = spawn("node", "node", *node_args, "--task", aggregator_task)
    assert aggregator.wait(120) == 0, aggregator.log()[-3000:]
    assert node.wait(60) == 0, node.log()[-3000:]
    # those exits say the broker had them; the watcher's copies may still be on their way
    assert len(watcher.wait_on(topics.update("pi-0"), bool, "the update")) == 1
    metrics = [decode_metrics(p) for p in watcher.wait_on(topics.metrics, through(1), "metrics")]
    assert [(m.round, m.participants, m.rejected) for m in metrics] == [(1, ["pi-0"], {})]
    written = json.loads(report.read_text())
    assert written["rounds"][0]["participants"] == 1
