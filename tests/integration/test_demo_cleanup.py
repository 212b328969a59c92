"""`fedmq demo` ends every process it started: on Ctrl-C, and when a child dies past its
restart cap (restarts themselves are tested in tests/faults/test_demo_supervision.py)."""

import os
import signal
import subprocess
import sys

import pytest

from ..conftest import alive, child_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start_long_demo(*extra: str) -> tuple[subprocess.Popen[str], list[int]]:
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "3", "--rounds", "100000", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    for line in demo.stdout:
        if line.startswith("round   2/"):
            break
    else:
        pytest.fail(f"the demo never reached round 2 (exit {demo.wait()})")
    children = child_pids(demo.pid)
    assert len(children) == 5, children  # mosquitto, aggregator, 3 nodes
    return demo, children


def _finish(demo: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    return demo.returncode, out


def test_ctrl_c_stops_every_child():
    demo, children = _start_long_demo()
    demo.send_signal(signal.SIGINT)
    code, out = _finish(demo)
    assert code == 130, out
    assert "interrupted" in out
    assert [pid for pid in children if alive(pid)] == []


def test_a_dead_child_fails_the_demo_and_the_rest_are_stopped():
    demo, children = _start_long_demo("--max-restarts", "0")
    node = max(children)  # the last node started
    os.kill(node, signal.SIGKILL)
    code, out = _finish(demo)
    assert code == 1, out
    assert "exited with -9" in out and "giving up after 0 restarts" in out
    assert [pid for pid in children if alive(pid)] == []
