"""`fedmq demo --nodes-per-process`: the demo supervises each node group as one child.
A group SIGKILLed mid-run is started again, its nodes resume from their state directories
and every node takes part in every round."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import alive, child_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]


def _group_pid(demo: int, name: str) -> int | None:
    for pid in child_pids(demo):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"node-group" in argv and any(arg.endswith(f"{name}.txt".encode()) for arg in argv):
            return pid
    return None


def test_a_killed_node_group_is_restarted_and_its_nodes_rejoin(tmp_path):
    rounds = 15
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "6", "--nodes-per-process", "3",
         "--rounds", str(rounds), "--workdir", str(tmp_path / "work"),
         "--report", str(tmp_path / "report.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("round   3/"):
                break
        victim = _group_pid(demo.pid, "group-02")
        assert victim is not None, (child_pids(demo.pid), "".join(seen))
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        out, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # the demo then ends its own children
            demo.wait(timeout=20)
    text = "".join(seen) + out
    assert demo.returncode == 0, text
    assert "group-02 (pid" in text and "exited with -9 (SIGKILL)" in text
    assert "restarts 1 (group-02 1)" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["restarts"] == {"total": 1, "by_child": {"group-02": 1}}
    assert [row["round"] for row in report["rounds"]] == list(range(1, rounds + 1))
    assert all(row["participants"] == 6 for row in report["rounds"])  # its nodes rejoined
    assert any(row["at"] > killed_at for row in report["rounds"])
    log = (tmp_path / "work" / "logs" / "group-02.log").read_text()
    assert log.count('"node_group.started"') == 2
    assert not alive(victim)
