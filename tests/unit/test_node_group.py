"""Many nodes per process (``fedmq node-group``, ``fedmq demo --nodes-per-process``): the
group file, its errors by line, the open-files limit, and the demo's grouping. Nothing here
starts a process, changes a limit or installs a signal handler."""

import argparse
import queue
import re
import resource
import shlex
from pathlib import Path

import pytest

from fedmq import mqtt as edge
from fedmq.cli import read_node_group
from fedmq.demo import child_argv, group_children, round_deadline
from fedmq.demo_settings import DemoSettings
from fedmq.files import ensure_open_files, open_files_plan
from fedmq.node.group import FILES_PER_NODE, Tagged, TaskShelf, open_files_needed
from fedmq.node.settings import NodeGroup, NodeSettings, group_lines

INFINITY = resource.RLIM_INFINITY


@pytest.fixture(autouse=True)
def _limits_as_found():
    """Nothing here may change the test process's limits (a lowered open-files limit
    breaks later tests that open a thousand sockets, tests/faults/test_burst.py)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def _args(path: Path, **given: object) -> argparse.Namespace:
    values = {"group_file": path, "stagger": 0.02, "log_json": None, "log_level": "info"}
    return argparse.Namespace(**{**values, **given})


def _group(tmp_path: Path, text: str, **given: object) -> NodeGroup:
    path = tmp_path / "nodes.txt"
    path.write_text(text)
    return read_node_group(_args(path, **given), {})


def _refusal(tmp_path: Path, text: str, **given: object) -> str:
    with pytest.raises(ValueError) as caught:
        _group(tmp_path, text, **given)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ the group file


def test_lines_skip_blanks_and_comments_and_take_shell_quoting():
    text = (
        "# the lab's first three\n"
        "\n"
        "--node-id a --data 'my data/a.npz'\n"
        "fedmq node --node-id b --data b.npz  # a comment after the options\n"
        "   node --node-id c --data c.npz\n"
    )
    assert group_lines(text) == [
        (3, ["--node-id", "a", "--data", "my data/a.npz"]),
        (4, ["--node-id", "b", "--data", "b.npz"]),
        (5, ["--node-id", "c", "--data", "c.npz"]),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--node-id 'a --data a.npz", "line 2: No closing quotation (quote it as in a shell)"),
        (
            "fedmq aggregator --nodes 3",
            "line 2: 'fedmq aggregator': a line holds one node's options",
        ),
        ("node-group other.txt", "line 2: 'node-group other.txt': a line holds one node's options"),
    ],
)
def test_a_line_that_is_no_node_command_is_named(line, expected):
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        group_lines(f"--node-id a --data a.npz\n{line}\n")


def test_each_line_is_read_as_fedmq_node_reads_its_command_line(tmp_path):
    group = _group(
        tmp_path,
        "--node-id a --data a.npz --broker 127.0.0.1:1999 --exit-when-done\n"
        "--node-id b --demo-shard 2/5 --federation lab --train-delay 0.5\n",
        stagger=0.1,
    )
    a, b = group.nodes
    assert (a.node_id, a.data, a.broker.port, a.exit_when_done) == ("a", Path("a.npz"), 1999, True)
    assert (b.node_id, b.demo_shard, b.federation, b.train_delay) == ("b", (1, 5), "lab", 0.5)
    assert group.stagger == 0.1


def test_a_typo_is_refused_with_its_line_number_in_one_line(tmp_path):
    message = _refusal(tmp_path, "--node-id a --data a.npz\n\n--node-id b --dta b.npz\n")
    assert message.startswith(f"{tmp_path / 'nodes.txt'} line 3: unrecognized arguments: --dta")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("--node-id a --data a.npz\n--data b.npz\n", "line 2: node.node_id is not set: give --node-id"),
        ("--node-id a --data a.npz\n--node-id b\n", "line 2: one of node.data, node.demo_shard must be set"),
        ("--node-id a --data a.npz --train-delay -1\n", "line 1: argument --train-delay"),
        ("--node-id a --data a.npz\n--help\n", "line 2: --help is not a node's option"),
        ("--node-id a --data a.npz --log-level debug\n", "line 1: --log-level: a node group logs one way"),
        ("--node-id a --data a.npz\n--node-id a --data b.npz\n",
         "line 2: node id 'a' of federation 'default' is already line 1's"),
        ("--node-id a --data a.npz --state-dir s\n--node-id b --data b.npz --state-dir s\n",
         "line 2: state directory s is already line 1's"),
        ("# nobody\n\n", "lists no node"),
    ],
)  # fmt: skip
def test_what_cannot_work_is_refused_naming_the_line(tmp_path, lines, expected):
    assert expected in _refusal(tmp_path, lines)


def test_the_same_node_id_in_another_federation_is_another_client(tmp_path):
    group = _group(
        tmp_path, "--node-id a --data a.npz\n--node-id a --data a.npz --federation other\n"
    )
    assert [n.state_path for n in group.nodes] == [
        Path(".fedmq-node/default/a"),
        Path(".fedmq-node/other/a"),
    ]


def test_log_options_on_lines_may_repeat_the_groups(tmp_path):
    group = _group(tmp_path, "--node-id a --data a.npz --log-json\n", log_json=True)
    assert group.nodes[0].log_json is True


def test_an_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^cannot read .*missing\.txt: No such file"):
        read_node_group(_args(tmp_path / "missing.txt"), {})


def test_the_environment_applies_to_every_line(tmp_path):
    group = _group(
        tmp_path, "--node-id a --data a.npz\n--node-id b --data b.npz --federation own\n"
    )
    assert {n.federation for n in group.nodes} == {"default", "own"}
    path = tmp_path / "nodes.txt"
    layered = read_node_group(_args(path), {"FEDMQ_CONNECTION_FEDERATION": "lab"})
    assert [n.federation for n in layered.nodes] == ["lab", "own"]


def test_a_group_object_checks_itself():
    with pytest.raises(ValueError, match="at least one node"):
        NodeGroup(nodes=())
    twin = NodeSettings(node_id="a", data=Path("a.npz"))
    with pytest.raises(ValueError, match="node 2: node id 'a'"):
        NodeGroup(nodes=(twin, twin))


# ------------------------------------------------------------------ sharing in a process


def test_a_node_inbox_tags_what_its_client_receives():
    shared: queue.Queue[tuple[int, edge.Received]] = queue.Queue()
    message = edge.Received("fedmq/x/global", b"m", True)
    Tagged(shared, 7).put(message)
    assert shared.get_nowait() == (7, message)


def test_one_task_object_per_name_so_one_compile():
    shelf = TaskShelf()
    first = shelf.load("digits-mlp")
    assert shelf.load("digits-mlp") is first
    assert shelf.load("mlp:64-16-10") is not first


# ------------------------------------------------------------------ open files


@pytest.mark.parametrize(
    ("needed", "soft", "hard", "plan"),
    [
        (500, 1024, 4096, (None, None)),  # enough already: never lowered
        (1024, 1024, 4096, (None, None)),
        (2000, 1024, 4096, (2000, None)),  # raised to what is needed, not to the hard limit
        (2000, 1024, INFINITY, (2000, None)),
        (2000, INFINITY, INFINITY, (None, None)),
    ],
)
def test_the_soft_limit_is_raised_only_as_far_as_needed(needed, soft, hard, plan):
    assert open_files_plan(needed, soft, hard) == plan


def test_a_hard_limit_too_low_is_refused_with_the_fix():
    raised, problem = open_files_plan(5000, 1024, 4096)
    assert raised is None
    assert problem is not None and "\n" not in problem
    assert "hard limit is 4096" in problem and "ulimit -n 5000" in problem


def test_ensure_open_files_sets_only_the_soft_limit_and_leaves_ours_alone():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    calls = []

    def fake_set(which, limits):
        calls.append((which, limits))

    assert ensure_open_files(3000, get=lambda _: (1024, 8192), set_limit=fake_set) == 3000
    assert calls == [(resource.RLIMIT_NOFILE, (3000, 8192))]
    assert ensure_open_files(500, get=lambda _: (1024, 8192), set_limit=fake_set) is None
    assert len(calls) == 1
    with pytest.raises(ValueError, match="ulimit -n 9000"):
        ensure_open_files(9000, get=lambda _: (1024, 8192), set_limit=fake_set)
    assert len(calls) == 1
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_a_thousand_nodes_need_a_few_thousand_files():
    assert open_files_needed(1000) == 256 + FILES_PER_NODE * 1000
    assert open_files_needed(1000) > 1024  # more than a usual default soft limit


# ------------------------------------------------------------------ the demo


def _demo_argv(tmp_path: Path, **given: object) -> dict[str, list[str]]:
    config = DemoSettings(**given)  # type: ignore[arg-type]
    paths = [tmp_path / f"node-{i + 1:02d}.npz" for i in range(config.node_count)]
    return child_argv(config, edge.BrokerAddress("127.0.0.1", 1883), tmp_path, None, paths)


def test_one_node_per_process_is_todays_demo(tmp_path):
    argv = _demo_argv(tmp_path, nodes=10)
    assert group_children(argv, 1, tmp_path / "groups") is argv
    assert not (tmp_path / "groups").exists()
    assert "--round-timeout" not in argv["aggregator"]  # the aggregator's default, as before


def test_groups_run_the_same_node_command_lines(tmp_path):
    argv = _demo_argv(tmp_path, nodes=25)
    grouped = group_children(argv, 10, tmp_path / "groups")
    assert list(grouped) == ["aggregator", "group-01", "group-02", "group-03"]
    assert grouped["aggregator"] == argv["aggregator"]
    files = [Path(grouped[name][1]) for name in ("group-01", "group-02", "group-03")]
    assert [grouped[n][0] for n in grouped if n != "aggregator"] == ["node-group"] * 3
    lines = [line for path in files for line in path.read_text().splitlines()]
    assert lines == [shlex.join(argv[f"node-{i:02d}"][1:]) for i in range(1, 26)]
    # and node-group reads each line back into the settings the lone node gets
    group = read_node_group(_args(files[2], log_json=True), {})
    assert [n.node_id for n in group.nodes] == [f"node-{i}" for i in range(21, 26)]
    assert all(n.exit_when_done and n.log_json for n in group.nodes)


def test_deadlines_grow_with_the_fleet():
    assert round_deadline(10) == round_deadline(1000) == 300.0
    assert round_deadline(2000) == 600.0
    assert DemoSettings(nodes=10).first_round_timeout == 120.0
    assert DemoSettings(nodes=1000).first_round_timeout == 250.0
    assert DemoSettings(nodes=1000, start_timeout=5.0).first_round_timeout == 5.0


def test_many_nodes_get_a_longer_round_deadline(tmp_path):
    argv = _demo_argv(tmp_path, nodes=1400)
    at = argv["aggregator"].index("--round-timeout")
    assert float(argv["aggregator"][at + 1]) == 420.0


def test_a_lengthened_deadline_is_reported():
    from fedmq.demo import run_policy_entries

    assert "round_timeout" not in run_policy_entries(DemoSettings(nodes=1000))
    assert run_policy_entries(DemoSettings(nodes=1400))["round_timeout"] == 420.0
