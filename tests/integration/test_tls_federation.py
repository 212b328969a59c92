"""A whole federation the way a deployment runs it: `fedmq broker init` files, mosquitto
with its TLS listener, and aggregator, nodes and a monitor started with nothing but
their bundle's fedmq.toml (plus each node's data and state dir) over TLS with passwords
and ACLs."""

import json
import uuid

import pytest

from broker import credentials
from broker.process import Mosquitto, free_port

pytestmark = pytest.mark.integration


def test_a_federation_over_tls_from_the_generated_bundles(spawn, node_data, tmp_path):  # type: ignore[no-untyped-def]
    root = tmp_path / "deployment"
    nodes = ["pi-01", "pi-02"]
    federation = f"tls-{uuid.uuid4().hex[:8]}"
    credentials.init_deployment(
        root, nodes=nodes, federation=federation, hostnames=["127.0.0.1"],
        tls_port=free_port(), listen="127.0.0.1",
    )  # fmt: skip
    layout = credentials.Layout(root)
    report = tmp_path / "report.json"
    with Mosquitto(config=root / "mosquitto.conf"):
        monitor = spawn(
            "monitor", "monitor", "--config", str(layout.bundle_dir("monitor") / "fedmq.toml"),
            "--json", "--until-done", "--timeout", "120",
        )  # fmt: skip
        aggregator = spawn(
            "aggregator", "aggregator",
            "--config", str(layout.bundle_dir("aggregator") / "fedmq.toml"),
            "--nodes", "2", "--rounds", "3", "--report", str(report), "--log-json",
        )  # fmt: skip
        children = [
            spawn(node, "node", "--config", str(layout.bundle_dir(node) / "fedmq.toml"),
                  "--data", str(path), "--state-dir", str(tmp_path / node),
                  "--exit-when-done", "--log-json")
            for node, path in zip(nodes, node_data(2), strict=True)
        ]  # fmt: skip
        assert aggregator.wait(120) == 0, aggregator.log()[-3000:]
        for child in children:
            assert child.wait(60) == 0, child.log()[-3000:]
        assert monitor.wait(60) == 0, monitor.log()[-3000:]

    rounds = json.loads(report.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participant_ids"] == nodes and r["rejected"] == {} for r in rounds)
    assert "(TLS)" in children[0].log()  # the node said where it connected: TLS listener
    seen = [
        json.loads(line)["round"]
        for line in monitor.log().splitlines()
        if line.startswith("{") and json.loads(line).get("type") == "metrics"
    ]
    assert seen == [1, 2, 3]  # the read-only monitor identity saw every round
