"""The simulation knobs for heterogeneous fleets (docs/simulation.md): ``fedmq node
--train-delay``, ``fedmq demo --slow-nodes``, the round policy and local epochs the demo
hands its aggregator, and what its report.json says about them."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import structlog

from fedmq import cli, config, settings
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.cli import main
from fedmq.datasets import Dataset
from fedmq.demo import child_argv, config_problem, run_policy_entries, slow_node_ids
from fedmq.demo_settings import DemoSettings
from fedmq.models import get_model
from fedmq.mqtt import BrokerAddress
from fedmq.node.app import Node
from fedmq.node.settings import NodeSettings
from fedmq.report import build_report
from fedmq.schemas import GlobalModel, Topics, TrainingPlan, decode_update, model_id_of

from .node_doubles import RecordingOutbox

FEDERATION = "unit-sim"
ADDRESS = BrokerAddress("127.0.0.1", 41883)


def parse(argv: list[str]):  # type: ignore[no-untyped-def]
    return config.parse_args(cli.build_parser(), argv, {})


def one_line_error(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# ---- fedmq node --train-delay ------------------------------------------------------------


def test_train_delay_is_a_node_setting_off_by_default() -> None:
    base = ["node", "--node-id", "n0", "--demo-shard", "1/1"]
    assert settings.build(NodeSettings, parse(base)).train_delay == 0.0
    assert settings.build(NodeSettings, parse([*base, "--train-delay", "0.25"])).train_delay == 0.25
    help_text = cli.build_parser().commands["node"].actions["train_delay"].help or ""
    assert help_text.startswith("SIMULATION ONLY")


@pytest.mark.parametrize("text", ["-1", "abc", "nan", "inf", ""])
def test_a_malformed_train_delay_is_refused_in_one_line(text: str, capsys) -> None:  # type: ignore[no-untyped-def]
    err = one_line_error(["node", "--node-id", "n0", "--demo-shard", "1/1", "--train-delay", text],
                         capsys)  # fmt: skip
    assert f"argument --train-delay: {text!r} is not a number >= 0" in err


def global_model() -> GlobalModel:
    params = get_model("digits-mlp").init(0)
    return GlobalModel(
        federation=FEDERATION, round=1, model="digits-mlp", model_id=model_id_of(params),
        params=params, plan=TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0),
    )  # fmt: skip


def slow_node(tmp_path: Path, delay: float, stop: threading.Event) -> tuple[Node, RecordingOutbox]:
    config = NodeSettings(
        broker=ADDRESS, federation=FEDERATION, node_id="pi-1", state_dir=tmp_path,
        train_delay=delay,
    )  # fmt: skip
    tmp_path.mkdir(exist_ok=True)
    data = Dataset(np.zeros((8, 64), np.float32), np.zeros(8, np.int64))
    outbox = RecordingOutbox()
    return Node(config, data, outbox, stop=stop), outbox  # type: ignore[arg-type]


def test_the_delay_is_waited_after_training_and_counted_in_train_seconds(tmp_path: Path) -> None:
    node, outbox = slow_node(tmp_path, 0.4, threading.Event())
    with structlog.testing.capture_logs() as logs:
        node.train_and_publish(global_model())
    [update] = outbox.on(Topics(FEDERATION).update("pi-1"))
    assert decode_update(update).train_seconds >= 0.4
    events = [e["event"] for e in logs]
    assert events.index("training.delayed") < events.index("update.published")
    assert node.last_trained == (1, global_model().model_id)


def test_a_stop_cuts_the_delay_short_and_sends_nothing(tmp_path: Path) -> None:
    stop = threading.Event()
    node, outbox = slow_node(tmp_path, 60.0, stop)
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        node.train_and_publish(global_model())
    assert time.monotonic() - started < 30  # training plus at most a moment, not 60 s
    assert outbox.on(Topics(FEDERATION).update("pi-1")) == []
    assert not (tmp_path / "last_update.msgpack").exists()  # a restart trains it again
    assert node.last_trained is None
    assert [e["event"] for e in logs if e["event"].startswith("training.delay")] == [
        "training.delayed",
        "training.delay_interrupted",
    ]


# ---- fedmq demo --slow-nodes, --min-nodes, --local-epochs ---------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("3:0.5", (3, 0.5)), ("0:1", (0, 1.0)), ("10:0", (10, 0.0))]
)
def test_slow_nodes_is_count_colon_seconds(text: str, expected: tuple[int, float]) -> None:
    assert (
        settings.build(DemoSettings, parse(["demo", "--slow-nodes", text])).slow_nodes == expected
    )


@pytest.mark.parametrize("text", ["3", "3:", ":0.5", "-1:0.5", "3:-0.5", "x:1", "3:abc", "3:inf"])
def test_malformed_slow_nodes_are_refused_in_one_line(text: str, capsys) -> None:  # type: ignore[no-untyped-def]
    err = one_line_error(["demo", f"--slow-nodes={text}"], capsys)
    assert f"argument --slow-nodes: {text!r} is not N:SECONDS" in err


@pytest.mark.parametrize(
    ("demo", "says"),
    [
        (DemoSettings(nodes=3, slow_nodes=(4, 0.5)), "--slow-nodes 4:0.5: the demo has only 3 nodes"),
        (DemoSettings(nodes=3, min_nodes=4), "--min-nodes 4: more than the demo's 3 nodes"),
    ],
)  # fmt: skip
def test_more_slow_nodes_or_quorum_than_nodes_is_refused_before_starting(demo, says) -> None:  # type: ignore[no-untyped-def]
    problem = config_problem(demo)
    assert problem is not None and problem.startswith(says)
    assert config_problem(DemoSettings(nodes=3, slow_nodes=(3, 0.5), min_nodes=3)) is None


@pytest.mark.parametrize(("option", "value"), [("--min-nodes", "0"), ("--local-epochs", "x")])
def test_malformed_quorum_or_epochs_are_refused_in_one_line(option, value, capsys) -> None:  # type: ignore[no-untyped-def]
    assert f"argument {option}: '{value}' is not a whole number >= 1" in one_line_error(
        ["demo", option, value], capsys
    )


def test_the_last_n_nodes_are_the_slow_ones(tmp_path: Path) -> None:
    demo = DemoSettings(nodes=4, slow_nodes=(2, 0.75), min_nodes=3, local_epochs=5)
    paths = [tmp_path / f"n{i}.npz" for i in range(4)]
    argv = child_argv(demo, ADDRESS, tmp_path, None, paths)
    delays = {
        name: settings.build(NodeSettings, parse(args)).train_delay
        for name, args in argv.items()
        if name != "aggregator"
    }
    assert delays == {"node-01": 0.0, "node-02": 0.0, "node-03": 0.75, "node-04": 0.75}
    assert slow_node_ids(demo, 4) == ("node-03", "node-04")
    aggregator = settings.build(AggregatorSettings, parse(argv["aggregator"]))
    assert (aggregator.min_nodes, aggregator.local_epochs) == (3, 5)


def test_left_out_the_aggregator_gets_its_own_defaults(tmp_path: Path) -> None:
    """The reference run's command lines do not change."""
    argv = child_argv(DemoSettings(nodes=2), ADDRESS, tmp_path, tmp_path / "t.npz",
                      [tmp_path / "a.npz", tmp_path / "b.npz"])  # fmt: skip
    for option in ("--min-nodes", "--local-epochs", "--round-timeout", "--train-delay"):
        assert all(option not in args for args in argv.values()), option


# ---- report.json ---------------------------------------------------------------------------


def test_the_report_names_the_run_policy_only_when_given() -> None:
    assert run_policy_entries(DemoSettings()) == {}
    given = DemoSettings(nodes=10, slow_nodes=(3, 0.5), min_nodes=7, round_timeout=2.0)
    assert run_policy_entries(given) == {
        "min_nodes": 7,
        "round_timeout": 2.0,
        "slow_nodes": {"node_ids": ["node-08", "node-09", "node-10"], "train_delay": 0.5},
    }
    report = build_report(
        [], server_optimizer="fedavg", local_epochs=1, **run_policy_entries(given)
    )
    assert report["slow_nodes"]["node_ids"] == ["node-08", "node-09", "node-10"]
