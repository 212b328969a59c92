"""Many nodes per process, end to end: ``fedmq demo --nodes-per-process`` runs every node
each round with nothing rejected or dropped, and ``fedmq node-group`` refuses a bad line in
one line before it starts anything. Every process here is a child the test waits for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _processes_naming(text: str, pids: list[int]) -> list[str]:
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in argv:
            found.append(f"{pid}: {argv}")
    return found


@pytest.fixture(autouse=True)
def _nothing_left_behind(tmp_path):
    """Every process these tests start has ended when each test ends: our fedmq children,
    and anything anywhere whose command line names the test's directory (the demo's
    aggregator, broker and node groups are its children, not ours)."""
    yield
    everyone = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    assert _processes_naming("-m fedmq", child_pids(os.getpid())) == []
    assert _processes_naming(str(tmp_path), everyone) == []


def test_thirty_nodes_in_three_processes_all_take_part(tmp_path):
    report = tmp_path / "r.json"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "30", "--nodes-per-process", "10",
         "--rounds", "2", "--report", str(report), "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 node processes of up to 10 nodes" in result.stdout
    found = json.loads(report.read_text())
    assert [row["participants"] for row in found["rounds"]] == [30, 30]
    assert all(row["rejected"] == {} and row["broker_dropped"] == 0 for row in found["rounds"])
    assert found["restarts"]["total"] == 0
    logs = sorted(path.name for path in (tmp_path / "run" / "logs").iterdir())
    assert logs == ["aggregator.log", "group-01.log", "group-02.log", "group-03.log"]
    # each node kept its own state directory, as a lone node does
    assert all(
        (tmp_path / "run" / f"node-{i:02d}" / "last_update.msgpack").exists() for i in (1, 30)
    )


def test_a_group_with_a_typo_is_refused_in_one_line(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(
        "--node-id a --demo-shard 1/2 --broker 127.0.0.1:9\n"
        "--node-id b --demo-shard 2/2 --brokr 127.0.0.1:9\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "node-group", str(nodes)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"fedmq node-group: error: {nodes} line 2: unrecognized arguments: --brokr 127.0.0.1:9; "
        "did you mean --broker? (see fedmq node --help)\n"
    )
    assert not (tmp_path / ".fedmq-node").exists()  # refused before any node started


def test_a_stopped_group_leaves_every_node_offline_not_by_its_will(
    mosquitto, federation, spawn, collect, node_data, tmp_path
):
    """Three nodes in one process, no aggregator: each comes online under its own client
    id; SIGTERM ends the group (130) and every node hands its own retained ``offline``
    over, as a lone node does (a last will would carry no ``at`` time)."""
    from fedmq.schemas import Topics, decode_status
    from tests.conftest import ends_in, wait_until

    topics = Topics(federation)
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(
        "".join(
            f"--node-id g{i} --data {path} --broker {mosquitto.address} --federation {federation}\n"
            for i, path in enumerate(node_data(3))
        )
    )
    watcher = collect([topics.all_status])

    def last(node: str):
        seen = watcher.on(topics.status(node))
        return decode_status(seen[-1]) if seen else None

    group = spawn("group", "node-group", str(nodes), "--log-json")
    wait_until(
        lambda: all((s := last(f"g{i}")) is not None and s.state == "online" for i in range(3)),
        60, "three nodes online",
    )  # fmt: skip
    group.stop()
    assert group.proc.returncode == 130, group.log()[-2000:]
    for i in range(3):  # the exit says the broker has them; the watcher's copies may lag
        watcher.wait_on(topics.status(f"g{i}"), ends_in("offline"), f"g{i} offline")
        status = last(f"g{i}")
        assert status is not None and status.state == "offline" and status.at is not None
    assert '"node_group.stopped"' in group.log()
