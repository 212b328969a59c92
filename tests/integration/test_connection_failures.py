"""Failing loudly: a process that cannot reach its broker says why at every attempt, a
refused login ends it (exit 2), Ctrl-C ends a connecting node at once, a state directory
serves one process, and a node that stops on an error leaves the reason in its status.

Every cause is provoked for real on 127.0.0.1: a closed port, an unknown host name, a
TLS listener from `fedmq broker init` reached in plaintext (and the plain listener
reached with TLS), and a wrong password."""

import json
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker import credentials
from fedmq.broker.process import Mosquitto, free_port
from fedmq.schemas import Topics, decode_status

from ..conftest import Collector, wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Deployment:
    root: Path
    federation: str
    tls_port: int

    def config(self, role: str) -> str:
        return str(credentials.DeploymentFiles(self.root).bundle_dir(role) / "fedmq.toml")

    @property
    def ca(self) -> str:
        return str(credentials.DeploymentFiles(self.root).bundle_dir("monitor") / "ca.crt")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A broker with passwords on a TLS listener, from `fedmq broker init`."""
    root = tmp_path_factory.mktemp("deployment")
    federation = f"cf-{uuid.uuid4().hex[:8]}"
    tls_port = free_port()
    credentials.init_deployment(
        root, nodes=["pi-01"], federation=federation, hostnames=["127.0.0.1"],
        tls_port=tls_port, listen="127.0.0.1",
    )  # fmt: skip
    with Mosquitto(config=root / "mosquitto.conf"):
        yield Deployment(root, federation, tls_port)


def events(child, name: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The child's JSON log lines whose event is ``name``."""
    found = []
    for line in child.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def closed_port() -> int:
    port = free_port()
    with socket.socket() as probe:  # nothing listens there: a connect is refused
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_every_failed_connect_is_a_warning_with_its_cause(spawn, mosquitto, deployment):  # type: ignore[no-untyped-def]
    port = closed_port()
    cases = {
        # name: (arguments, words the reason must hold)
        "closed": (["--broker", f"127.0.0.1:{port}"], ["refused", f"127.0.0.1:{port}"]),
        "unknown host": (
            ["--broker", "no-such-host.invalid:1883"],
            ["unknown host", "no-such-host.invalid"],
        ),
        "plaintext to TLS": (["--broker", f"127.0.0.1:{deployment.tls_port}"], ["--tls-ca"]),
        "TLS to plaintext": (
            ["--broker", mosquitto.address, "--tls-ca", deployment.ca],
            ["TLS", "plain MQTT"],
        ),
    }
    children = {
        name: spawn(f"monitor-{i}", "monitor", "--log-json", "--json", *args)
        for i, (name, (args, _)) in enumerate(cases.items())
    }
    for name, (_, words) in cases.items():
        child = children[name]
        # every attempt is logged, not only the first: wait for a retry's line too
        wait_until(
            lambda child=child: len(events(child, "mqtt.connect_failed")) >= 2,
            30,
            f"two connect_failed warnings ({name}); log:\n{child.log()[-2000:]}",
        )
        for entry in events(child, "mqtt.connect_failed"):
            assert entry["level"] == "warning", entry
            for word in words:
                assert word in entry["reason"], (name, entry)


@pytest.mark.parametrize("role", ["node", "aggregator", "monitor"])
def test_a_refused_login_exits_2_after_a_few_tries(spawn, deployment, tmp_path, role):  # type: ignore[no-untyped-def]
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    account = "pi-01" if role == "node" else role
    extra = {
        "node": ["--demo-shard", "1/2", "--state-dir", str(tmp_path / "node")],
        "aggregator": ["--state-dir", str(tmp_path / "aggregator"), "--test-data", "none"],
        "monitor": [],
    }[role]
    child = spawn(
        role, role, "--config", deployment.config(account), "--password-file", str(wrong),
        "--log-json", *extra,
    )  # fmt: skip
    started = time.monotonic()
    assert child.wait(60) == 2, child.log()[-3000:]
    refusals = events(child, "mqtt.connect_failed")
    assert len(refusals) >= 2, child.log()[-3000:]
    assert all("not authori" in e["reason"].lower() for e in refusals), refusals
    last = child.log().strip().splitlines()[-1]
    assert last.startswith(f"fedmq {role}: error: ") and "--password-file" in last, last
    assert time.monotonic() - started < 45


def test_ctrl_c_stops_a_connecting_node_within_a_second(spawn, tmp_path):  # type: ignore[no-untyped-def]
    node = spawn(
        "node", "node", "--broker", f"127.0.0.1:{closed_port()}", "--node-id", "pi-01",
        "--demo-shard", "1/2", "--log-json",
    )  # fmt: skip
    wait_until(lambda: events(node, "node.started"), 60, "the node to start connecting")
    node.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = node.wait(15)
    stopped_in = time.monotonic() - sent
    assert code == 130, node.log()[-3000:]
    assert stopped_in < 2.5, f"{stopped_in:.1f} s"  # 1 s and a margin for a busy machine


def test_a_state_directory_serves_one_process_at_a_time(spawn, mosquitto, federation, tmp_path):  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared-state"
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    first = spawn("node-a", "node", *common, "--node-id", "a", "--demo-shard", "1/2",
                  "--state-dir", str(shared))  # fmt: skip
    wait_until(lambda: events(first, "node.started"), 60, "node a to start")
    second = spawn("node-b", "node", *common, "--node-id", "b", "--demo-shard", "2/2",
                   "--state-dir", str(shared))  # fmt: skip
    assert second.wait(60) == 2, second.log()[-3000:]
    line = second.log().strip().splitlines()[-1]
    assert line.startswith("fedmq node: error: ") and str(shared) in line, line
    assert f"pid {first.proc.pid} on {socket.gethostname()}" in line, line
    # the kernel releases the lock of a process that died, however it died
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    third = spawn("node-c", "node", *common, "--node-id", "a", "--demo-shard", "1/2",
                  "--state-dir", str(shared))  # fmt: skip
    wait_until(lambda: events(third, "node.started"), 60, "node a to start again")

    aggregator_dir = tmp_path / "aggregator-state"
    aggregator = ["aggregator", *common, "--state-dir", str(aggregator_dir), "--test-data", "none"]
    holder = spawn("aggregator-1", *aggregator)
    wait_until(lambda: (aggregator_dir / "lock").exists() and holder.proc.poll() is None
               and "aggregator" in holder.log(), 60, "the first aggregator")  # fmt: skip
    wait_until(lambda: str(holder.proc.pid) in (aggregator_dir / "lock").read_text(), 30,
               "the holder's pid in the lock file")  # fmt: skip
    other = spawn("aggregator-2", *aggregator)
    assert other.wait(60) == 2, other.log()[-3000:]
    line = other.log().strip().splitlines()[-1]
    assert str(aggregator_dir) in line and f"pid {holder.proc.pid}" in line, line


def test_nodes_started_in_one_directory_keep_apart_by_default(
    spawn, mosquitto, federation, tmp_path
):  # type: ignore[no-untyped-def]
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--nodes", "2", "--rounds", "2",
        "--test-data", "none", "--state-dir", str(tmp_path / "aggregator"),
    )  # fmt: skip
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--demo-shard", f"{i}/2",
              "--exit-when-done")  # no --state-dir: both in the spawn's working directory
        for i in (1, 2)
    ]  # fmt: skip
    assert aggregator.wait(120) == 0, aggregator.log()[-3000:]
    for node in nodes:
        assert node.wait(60) == 0, node.log()[-3000:]
    for i in (1, 2):
        assert (tmp_path / ".fedmq-node" / federation / f"pi-{i}" / "last_update.msgpack").is_file()


def retained_status(mosquitto: Mosquitto, topics: Topics, node_id: str):  # type: ignore[no-untyped-def]
    """The status the broker keeps for ``node_id``, read by a fresh subscriber."""
    collector = Collector((mosquitto.host, mosquitto.port), [topics.status(node_id)])
    try:
        wait_until(lambda: collector.on(topics.status(node_id)), 10, "the retained status")
        return decode_status(collector.on(topics.status(node_id))[-1])
    finally:
        collector.close()


def test_a_node_whose_data_does_not_fit_leaves_the_reason_in_its_status(
    spawn, mosquitto, federation, tmp_path
):  # type: ignore[no-untyped-def]
    data = tmp_path / "ten-features.npz"
    np.savez(data, x=np.zeros((20, 10), np.float32), y=np.zeros(20, np.int32))
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    spawn("aggregator", "aggregator", *common, "--nodes", "1", "--test-data", "none",
          "--state-dir", str(tmp_path / "aggregator"))  # fmt: skip
    node = spawn("node", "node", *common, "--node-id", "pi-01", "--data", str(data),
                 "--state-dir", str(tmp_path / "node"))  # fmt: skip
    assert node.wait(120) == 2, node.log()[-3000:]
    status = retained_status(mosquitto, Topics(federation), "pi-01")
    assert status.state == "offline", status
    assert status.detail is not None and "10 features" in status.detail, status


def test_a_node_whose_training_diverges_says_why(spawn, mosquitto, federation, collect, tmp_path):  # type: ignore[no-untyped-def]
    topics = Topics(federation)
    watcher = collect([topics.status("pi-01")])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    spawn("aggregator", "aggregator", *common, "--nodes", "1", "--test-data", "none",
          "--learning-rate", "1e30", "--state-dir", str(tmp_path / "aggregator"))  # fmt: skip
    spawn("node", "node", *common, "--node-id", "pi-01", "--demo-shard", "1/2",
          "--state-dir", str(tmp_path / "node"))  # fmt: skip

    def errors():  # type: ignore[no-untyped-def]
        return [s for s in map(decode_status, watcher.on(topics.status("pi-01")))
                if s.state == "error"]  # fmt: skip

    wait_until(errors, 120, "the node's error status")
    detail = errors()[-1].detail or ""
    assert "diverged" in detail and "1e+30" in detail and "--learning-rate" in detail, detail


def test_a_node_group_refused_its_login_over_tls_exits_2(spawn, deployment, tmp_path):  # type: ignore[no-untyped-def]
    """The same through a node group's shared network loop (``fedmq.netloop``): the TLS
    handshake on its connect thread, the broker's refusal read on its network thread."""
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(
        f"--config {deployment.config('pi-01')} --password-file {wrong} --demo-shard 1/2 "
        f"--state-dir {tmp_path / 'node'}\n"
    )
    group = spawn("group", "node-group", str(nodes), "--log-json")
    assert group.wait(60) == 2, group.log()[-3000:]
    refusals = events(group, "mqtt.connect_failed")
    assert len(refusals) >= 2, group.log()[-3000:]
    assert all("not authori" in e["reason"].lower() for e in refusals), refusals
    last = group.log().strip().splitlines()[-1]
    assert last.startswith("fedmq node-group: error: ") and "--password-file" in last, last


def test_ctrl_c_stops_a_connecting_node_group_within_a_second(spawn, tmp_path):  # type: ignore[no-untyped-def]
    port = closed_port()
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(
        "".join(
            f"--broker 127.0.0.1:{port} --node-id g{i} --demo-shard {i + 1}/3 "
            f"--state-dir {tmp_path / f'g{i}'}\n"
            for i in range(3)
        )
    )
    group = spawn("group", "node-group", str(nodes), "--log-json")
    wait_until(lambda: events(group, "node_group.started"), 60, "the group to start connecting")
    wait_until(lambda: len(events(group, "mqtt.connect_failed")) >= 3, 30, "failed attempts")
    group.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = group.wait(15)
    stopped_in = time.monotonic() - sent
    assert code == 130, group.log()[-3000:]
    assert stopped_in < 2.5, f"{stopped_in:.1f} s"
