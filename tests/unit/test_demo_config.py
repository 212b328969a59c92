"""`fedmq demo` refuses a configuration that cannot work before it starts anything."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker.process import free_port
from fedmq.cli import main
from fedmq.datasets import digits, load_npz, partition
from fedmq.demo import DemoSettings, child_argv, config_problem, write_node_data
from fedmq.mqtt import BrokerAddress
from fedmq.tasks.builtin_data import split_builtin


def test_the_reference_configuration_is_fine(tmp_path: Path) -> None:
    assert config_problem(DemoSettings(report=tmp_path / "report.json")) is None
    assert config_problem(DemoSettings(model="mlp:64-16-16-10")) is None


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("mlp:8-32-3", "task mlp:8-32-3 takes 8 features and 3 classes"),
        ("mlp:64-32-3", "task mlp:64-32-3 takes 64 features and 3 classes"),
        ("mlp:10-32-10", "task mlp:10-32-10 takes 10 features and 10 classes"),
    ],
)
def test_a_model_that_does_not_fit_the_digits_data(model: str, says: str) -> None:
    """It reached the nodes, which failed and were restarted three times (issue 11)."""
    assert config_problem(DemoSettings(model=model)) == (
        f"{says}; the demo's digits data has 64 features and 10 classes: use --task "
        "digits-mlp, or mlp:64-...-10 (e.g. mlp:64-32-10)"
    )


def test_a_report_that_cannot_be_written(tmp_path: Path) -> None:
    """It was found out after the whole run, naming report.json.tmp (issue 11)."""
    target = tmp_path / "missing" / "report.json"
    assert config_problem(DemoSettings(report=target)) == (
        f"--report {target}: directory {target.parent} does not exist "
        "(create it or choose another path)"
    )


@pytest.mark.parametrize(
    ("argv", "prog", "says"),
    [
        (["demo", "--model", "mlp-64"], "fedmq demo", "argument --model: unknown model 'mlp-64'"),
        (["demo", "--partition", "x"], "fedmq demo", "argument --partition: partition 'x' is"),
        (["demo", "--nodes", "0"], "fedmq demo", "argument --nodes: '0' is not a whole number"),
        (
            ["demo", "--compresion", "int8"],
            "fedmq",
            "unrecognized arguments: --compresion int8; did you mean --compression?",
        ),
        (
            ["aggregator", "--final-delivery-wiat=3"],
            "fedmq",
            "unrecognized arguments: --final-delivery-wiat=3; did you mean --final-delivery-wait?",
        ),
        (["demo", "--xyz"], "fedmq", "unrecognized arguments: --xyz (see"),  # nothing close
        (
            ["demo", "--start-timeout", "0"],
            "fedmq demo",
            "argument --start-timeout: '0' is not a number > 0",
        ),
    ],
)
def test_a_typo_on_the_command_line_is_one_line(argv, prog, says, capsys) -> None:  # type: ignore[no-untyped-def]
    """The usage text came first, a dozen lines above the reason (issue 11)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ") and says in err
    assert err.endswith(f" (see {prog} --help)\n")


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("x.npy", lambda p: np.save(p, np.zeros((4, 64))), "one array (an .npy file), not"),
        ("gone.npz", lambda p: None, "cannot read x and y from it (No such file or directory)"),
        ("x.npz", lambda p: np.savez(p, x=np.zeros((4, 64))), "no array y (it holds x)"),
    ],
)
def test_a_node_given_bad_data_says_so_in_one_line(tmp_path: Path, name, make, says) -> None:  # type: ignore[no-untyped-def]
    """`--data x.npy` ended in a TypeError traceback (issue 11)."""
    data = tmp_path / name
    make(data)
    done = subprocess.run(
        [sys.executable, "-m", "fedmq", "node", "--node-id", "n1", "--data", str(data),
         "--broker", "127.0.0.1:1", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"fedmq node: error: {data}") and says in done.stderr


def test_more_nodes_than_the_digits_data_has_samples() -> None:
    assert config_problem(DemoSettings(nodes=1501)) == (
        "--nodes 1501: the digits data has 1500 training samples to split: use at most 1500"
    )
    assert config_problem(DemoSettings(nodes=1500)) is None


@pytest.mark.parametrize("workdir", ["/proc/fedmq-demo", "/etc/hostname"])
def test_a_workdir_that_cannot_be_used_is_one_line(workdir: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """It was an errno with a path inside it ('/etc/hostname/data')."""
    assert main(["demo", "--workdir", workdir]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedmq demo: error: --workdir {workdir}: cannot use it (")
    assert err.endswith("): choose a directory you can write\n") and err.count("\n") == 1


def test_a_file_that_is_not_npz_is_not_told_to_load_it_unsafely(tmp_path: Path) -> None:
    """numpy's own message suggested allow_pickle=True for a CSV file."""
    path = tmp_path / "data.csv"
    path.write_text("a,b,label\n1,2,0\n")
    with pytest.raises(ValueError) as raised:
        load_npz(path)
    assert str(raised.value) == (
        f"{path}: not an .npz file (nor .npy): save it with numpy.savez(PATH, x=x, y=y)"
    )


@pytest.mark.slow
def test_a_broker_that_does_not_answer_is_a_configuration_error(tmp_path: Path) -> None:
    """`--broker` with nothing listening ended "fedmq demo failed: could not subscribe"."""
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--broker", f"127.0.0.1:{port}",
         "--nodes", "1", "--rounds", "1", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"fedmq demo: error: no MQTT broker answered at 127.0.0.1:{port} within 10 s: check "
        "--broker, or leave it out and the demo starts its own"
    )
    assert not list((tmp_path / "work" / "logs").iterdir())  # no child was started


def test_the_issues_model_typo_ends_the_demo_in_one_line_before_it_starts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--model", "mlp:8-32-3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""  # nothing started: no banner, no broker
    assert done.stderr.startswith("fedmq demo: error: task mlp:8-32-3 takes 8 features")
    assert done.stderr.count("\n") == 1


# ------------------------------------------------------------------ --data-dir and tasks


def _node_files(directory: Path, count: int, x_shape=(8,), y_float=False, test=True) -> None:  # type: ignore[no-untyped-def]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"node-{i}" for i in range(1, count + 1)] + (["test"] if test else [])
    for name in names:
        x = rng.normal(size=(6, *x_shape))
        y = rng.normal(size=6) if y_float else rng.integers(0, 3, 6)
        np.savez(directory / f"{name}.npz", x=x, y=y)


MY_TASKS = """
import jax.numpy as jnp
import optax

from fedmq import Task

task = Task(name="mine", init=lambda key: {"w": jnp.zeros(2)},
            loss=lambda p, batch: jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2),
            optimizer=optax.sgd(0.1))
"""


def test_a_task_that_cannot_be_loaded_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_tasks.py").write_text(MY_TASKS)
    typo = config_problem(DemoSettings(task="my_taks:task", data_dir=tmp_path))
    assert typo is not None and typo.startswith("task 'my_taks:task': ") and "\n" not in typo
    assert "my_taks" in typo
    attribute = config_problem(DemoSettings(task="my_tasks:tsak", data_dir=tmp_path))
    assert attribute is not None and "tsak" in attribute and "\n" not in attribute


def test_a_task_without_built_in_data_needs_data_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_tasks.py").write_text(MY_TASKS)
    assert config_problem(DemoSettings(task="my_tasks:task")) == (
        "task my_tasks:task has no built-in data: give --data-dir DIR holding one node-*.npz "
        "per node (node-01.npz, node-02.npz, ...: arrays x and y) and, for central "
        "evaluation, test.npz (docs/tasks.md)"
    )


@pytest.mark.parametrize("task", ["digits-cnn", "activity-cnn", "diabetes-mlp"])
def test_the_built_in_examples_bring_their_own_data(task: str) -> None:
    assert config_problem(DemoSettings(task=task, nodes=3)) is None


@pytest.mark.parametrize(
    ("task", "limit", "says"),
    [
        ("activity-cnn", 100, "the built-in data of task activity-cnn is for at most 100 nodes"),
        ("diabetes-mlp", 354, "the built-in data of task diabetes-mlp is for at most 354 nodes"),
        ("digits-cnn", 1500, "the digits data has 1500 training samples to split"),
    ],
)
def test_an_example_task_has_data_for_so_many_nodes(task: str, limit: int, says: str) -> None:
    assert config_problem(DemoSettings(task=task, nodes=limit)) is None
    assert config_problem(DemoSettings(task=task, nodes=limit + 1)) == (
        f"--nodes {limit + 1}: {says}: use at most {limit}"
    )


def test_data_dir_gives_one_node_per_file_and_any_task(tmp_path: Path) -> None:
    _node_files(tmp_path / "data", 3)
    for config in [
        DemoSettings(task="my_tasks:task", data_dir=tmp_path / "data"),
        DemoSettings(task="mlp:8-32-3", data_dir=tmp_path / "data", nodes=3),  # not digits
    ]:
        assert config_problem(config) is None


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: None, "--data-dir {d}: it does not exist: give the directory holding"),
        (lambda d: d.write_text(""), "--data-dir {d}: it is not a directory: give the"),
        (
            lambda d: d.mkdir(),
            "--data-dir {d}: no node-*.npz files in it: write one per node (node-01.npz, "
            "node-02.npz, ...: numpy.savez(PATH, x=x, y=y)) and, for central evaluation, "
            "test.npz",
        ),
        (lambda d: _node_files(d, 2, test=False) or (d / "node-2.npz").write_text("a,b\n"),
         "--data-dir {d}: {d}/node-2.npz: not an .npz file (nor .npy): save it with"),
        (lambda d: _node_files(d, 2) or np.savez(d / "test.npz", x=np.ones((3, 8)),
                                                  y=np.array([0, -1, 2])),
         "--data-dir {d}: {d}/test.npz: y holds -1; class ids are 0, 1, 2, ... (>= 0)"),
        (lambda d: _node_files(d, 2) or np.savez(d / "node-2.npz", x=np.ones((3, 8, 2)),
                                                  y=np.array([0, 1, 2])),
         "--data-dir {d}: node-2.npz holds x (n, 8, 2) and y (n) of class ids where "
         "node-1.npz holds x (n, 8) and y (n) of class ids: one task trains them all"),
        (lambda d: _node_files(d, 2) or np.savez(d / "test.npz", x=np.ones((3, 8)),
                                                  y=np.ones(3)),
         "--data-dir {d}: test.npz holds x (n, 8) and y (n) of float targets where "
         "node-1.npz holds x (n, 8) and y (n) of class ids"),
    ],
)  # fmt: skip
def test_a_data_dir_that_cannot_serve_is_one_line(tmp_path: Path, make, says: str) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "data"
    make(directory)
    problem = config_problem(DemoSettings(task="my_tasks:task", data_dir=directory))
    assert problem is not None and problem.startswith(says.format(d=directory)), problem
    assert "\n" not in problem


def test_nodes_given_must_match_the_node_files(tmp_path: Path) -> None:
    _node_files(tmp_path, 3)
    assert config_problem(DemoSettings(data_dir=tmp_path, nodes=3)) is None
    assert config_problem(DemoSettings(data_dir=tmp_path, nodes=10)) == (
        f"--nodes 10: --data-dir {tmp_path} has 3 node files (node-*.npz), one per node: "
        "leave --nodes out, or add or remove node files"
    )
    assert config_problem(DemoSettings(data_dir=tmp_path, partition="dirichlet:0.5")) == (
        "--partition dirichlet:0.5: with --data-dir the node files are the split: leave "
        "--partition out"
    )


def test_data_dir_files_are_the_nodes_and_test_set(tmp_path: Path) -> None:
    _node_files(tmp_path, 3, x_shape=(4, 2), y_float=True)
    (tmp_path / "notes.npz").write_bytes(b"")  # not node-*: not a node
    nodes, test = write_node_data(DemoSettings(data_dir=tmp_path), tmp_path / "unused")
    assert [p.name for p in nodes] == ["node-1.npz", "node-2.npz", "node-3.npz"]
    assert test == tmp_path / "test.npz"
    assert not (tmp_path / "unused").exists()  # the user's files are used where they are
    (tmp_path / "test.npz").unlink()
    assert write_node_data(DemoSettings(data_dir=tmp_path), tmp_path)[1] is None
    # no test set: the aggregator runs with --test-data none (federated evaluation: auto)
    argv = child_argv(
        DemoSettings(data_dir=tmp_path, nodes=3), BrokerAddress("127.0.0.1", 1), tmp_path,
        None, nodes,
    )  # fmt: skip
    aggregator = argv["aggregator"]
    assert aggregator[aggregator.index("--test-data") + 1] == "none"
    assert aggregator[aggregator.index("--nodes") + 1] == "3"


@pytest.mark.parametrize(("task", "nodes"), [("activity-cnn", 3), ("diabetes-mlp", 4)])
def test_an_example_task_gets_its_built_in_split(tmp_path: Path, task: str, nodes: int) -> None:
    config = DemoSettings(task=task, nodes=nodes, partition="dirichlet:0.5", seed=3)
    paths, test_path = write_node_data(config, tmp_path)
    split = split_builtin(task, nodes, "dirichlet:0.5", 3)
    assert split is not None
    shards, test = split
    assert [p.name for p in paths] == [f"node-{i:02d}.npz" for i in range(1, nodes + 1)]
    for path, shard in zip(paths, shards, strict=True):
        loaded = load_npz(path)
        assert loaded.x.tobytes() == shard.x.tobytes() and loaded.y.tobytes() == shard.y.tobytes()
    assert test_path is not None
    assert load_npz(test_path).x.tobytes() == test.x.tobytes()


@pytest.mark.parametrize("task", ["digits-mlp", "digits-cnn", "mlp:64-16-10"])
def test_the_digits_tasks_get_the_reference_shards(tmp_path: Path, task: str) -> None:
    paths, test_path = write_node_data(DemoSettings(task=task, nodes=4), tmp_path)
    train, test = digits()
    for path, part in zip(paths, partition(train.y, 4, "iid", 0), strict=True):
        with np.load(path) as saved:
            assert saved["x"].tobytes() == train.x[part].tobytes()
            assert saved["y"].tobytes() == train.y[part].tobytes()
    assert test_path is not None
    with np.load(test_path) as saved:
        assert saved["x"].tobytes() == test.x.tobytes()


def test_data_dir_with_no_node_files_ends_the_demo_in_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--task", "my_tasks:task", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmq demo: error: --data-dir {tmp_path}: no node-*.npz files in it: write one per "
        "node (node-01.npz, node-02.npz, ...: numpy.savez(PATH, x=x, y=y)) and, for central "
        "evaluation, test.npz\n"
    )
