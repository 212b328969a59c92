"""`fedmq demo` refuses a configuration that cannot work before it starts anything."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker.process import free_port
from fedmq.cli import main
from fedmq.datasets import load_npz
from fedmq.demo import DemoSettings, config_problem


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
        (["demo", "--compresion", "int8"], "fedmq", "unrecognized arguments: --compresion int8"),
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
