"""Asynchronous mode through a real mosquitto with a slow node: versions are made every
K updates without waiting for it, its updates arrive stale and still count, scaled."""

import json
import subprocess
import sys
from collections import Counter

import pytest

pytestmark = pytest.mark.integration


def test_an_async_federation_does_not_wait_for_its_slow_node(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--nodes", "5", "--rounds", "40", "--seed", "0",
         "--mode", "async", "--buffer", "2", "--max-staleness", "1000", "--slow-nodes", "1:0.2",
         "--report", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads(report.read_text())
    assert (written["mode"], written["buffer"], written["staleness"]) == ("async", 2, "poly:0.5")
    rows = written["rounds"]
    assert [row["round"] for row in rows] == list(range(1, 41))
    assert {row["closed_by"] for row in rows} == {"buffer_full"}
    elapsed = [row["elapsed"] for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    taken = Counter(node for row in rows for node in row["participant_ids"])
    # the slow node (the last) trains ~0.2 s a version, the others a few ms: it is in far
    # fewer versions, and the versions it is in hold its update stale
    assert 0 < taken["node-05"] < min(taken[f"node-0{i}"] for i in range(1, 5))
    # (its first update may be fresh: the others may still be starting up)
    assert any(row["staleness_max"] >= 1 for row in rows if "node-05" in row["participant_ids"])
    for row in rows:
        assert set(row["rejected"]) <= {"stale", "duplicate"}, row["rejected"]
        assert row["broker_dropped"] in (0, None)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
