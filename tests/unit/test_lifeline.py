"""fedmq.lifeline: a child started through ``tied`` ends when its parent does, SIGKILL too."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmq import lifeline

from ..conftest import alive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

PARENT = """
import subprocess, sys
from fedmq.lifeline import tied
child = subprocess.Popen(tied(["sleep", "600"]), start_new_session=True)
print(child.pid, flush=True)
sys.stdin.read()  # until the test kills us
"""


def test_the_child_ends_when_its_parent_is_sigkilled() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        _kill_and_watch(parent)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill_and_watch(parent: subprocess.Popen[str]) -> None:
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while _command(child) != "sleep":  # the wrapper exec's it in the same PID
            assert time.monotonic() < deadline, _command(child)
            time.sleep(0.02)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_parent_gone_before_the_wrapper_ran_ends_the_child_at_once() -> None:
    """The wrapper is told PID 1 is its parent: not so, as if the real one had died and
    the child had been handed to init before prctl; it must not run the command."""
    argv = lifeline.tied(["sleep", "600"])
    argv[argv.index(str(os.getpid()))] = "1"
    done = subprocess.run(argv, timeout=30)
    assert done.returncode == -signal.SIGKILL


def test_the_command_runs_in_the_wrappers_process() -> None:
    done = subprocess.run(
        lifeline.tied([sys.executable, "-c", "import os; print(os.getppid())"]),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0 and int(done.stdout) == os.getpid()


def test_a_command_that_cannot_run_is_one_line() -> None:
    done = subprocess.run(
        lifeline.tied(["/nonexistent/mosquitto"]), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 127
    assert done.stderr == "cannot run /nonexistent/mosquitto: No such file or directory\n"
