"""A whole federation the way a deployment runs it: `fedmq broker init` files, mosquitto
with its TLS listener, and aggregator, nodes and a monitor started with nothing but
their bundle's fedmq.toml (plus each node's data and state dir) over TLS with passwords
and ACLs."""

import json
import time
import uuid

import numpy as np
import pytest

from fedmq.broker import bundle, credentials
from fedmq.broker.process import Mosquitto, free_port
from fedmq.schemas import NodeUpdate, Topics, decode_global, encode

from .test_security import Probe

pytestmark = pytest.mark.integration


def test_a_federation_over_tls_from_the_generated_bundles(spawn, node_data, tmp_path):  # type: ignore[no-untyped-def]
    root = tmp_path / "deployment"
    nodes = ["pi-01", "pi-02"]
    federation = f"tls-{uuid.uuid4().hex[:8]}"
    credentials.init_deployment(
        root, nodes=nodes, federation=federation, hostnames=["127.0.0.1"],
        tls_port=free_port(), listen="127.0.0.1",
    )  # fmt: skip
    layout = credentials.DeploymentFiles(root)
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
        spoof_as_pi_02_from_pi_01(layout, federation)
        deadline = time.monotonic() + 60
        while "node_id_mismatch" not in aggregator.log():
            assert time.monotonic() < deadline, aggregator.log()[-3000:]
            time.sleep(0.1)
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
    assert all(r["participant_ids"] == nodes for r in rounds)
    # pi-01's account sent an update claiming to be pi-02: refused, and counted
    assert [r["rejected"] for r in rounds] == [{"node_id_mismatch": 1}, {}, {}]
    assert "(TLS)" in children[0].log()  # the node said where it connected: TLS listener
    seen = [
        json.loads(line)["round"]
        for line in monitor.log().splitlines()
        if line.startswith("{") and json.loads(line).get("type") == "metrics"
    ]
    assert seen == [1, 2, 3]  # the read-only monitor identity saw every round


def spoof_as_pi_02_from_pi_01(layout: credentials.DeploymentFiles, federation: str) -> None:
    """With pi-01's credentials (the ACL lets it write only its own topics), publish on
    pi-01's update topic a valid update whose payload says it is pi-02's."""
    settings = bundle.load(layout.bundle_dir("pi-01"))
    topics = Topics(federation)
    probe = Probe()
    assert probe.connect(
        settings.port,
        username=settings.username,
        password=settings.password_file.read_text().strip(),
        ca=settings.ca_file,
    )
    try:
        probe.subscribe(topics.global_model)
        deadline = time.monotonic() + 60
        while not probe.got():
            assert time.monotonic() < deadline, "no retained global model"
            time.sleep(0.05)
        model = decode_global(probe.got()[0][1])
        spoof = NodeUpdate(
            federation=federation, node_id="pi-02", round=model.round,
            base_model_id=model.model_id, num_examples=10, train_loss=1.0, train_seconds=0.1,
            delta={name: np.zeros_like(array) for name, array in model.params.items()},
        )  # fmt: skip
        probe.publish(topics.update("pi-01"), encode(spoof))
    finally:
        probe.close()  # before the real pi-01 connects: same account, same client id
