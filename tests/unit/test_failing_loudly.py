"""Pure parts of failing loudly: connect errors in words, the state directory lock, the
node's default state directory."""

import errno
import os
import socket
import ssl
from pathlib import Path

import pytest

from fedmq import mqtt as edge
from fedmq.files import DirectoryLocked, lock_directory
from fedmq.node.settings import default_state_dir

BROKER = edge.BrokerAddress("hub.local", 8883)
TLS_BROKER = edge.BrokerAddress("hub.local", 1883, edge.Credentials(ca_file=Path("/ca.crt")))


def test_connect_errors_are_told_in_words_with_a_hint() -> None:
    refused = edge.describe_connect_error(ConnectionRefusedError(errno.ECONNREFUSED, "x"), BROKER)
    assert "refused" in refused and "hub.local:8883" in refused and "running" in refused
    unknown = edge.describe_connect_error(socket.gaierror(-2, "Name or service not known"), BROKER)
    assert "unknown host hub.local" in unknown and "Name or service not known" in unknown
    timeout = edge.describe_connect_error(TimeoutError("timed out"), BROKER)
    assert "no answer" in timeout
    unreachable = edge.describe_connect_error(OSError(errno.EHOSTUNREACH, "No route"), BROKER)
    assert "No route" in unreachable
    wrong_version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    plain = edge.describe_connect_error(wrong_version, TLS_BROKER)
    assert (
        "TLS handshake with hub.local:1883 failed" in plain
        and "plain MQTT" in plain
        and "--tls-ca" in plain
    )
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "unable to get local issuer certificate"
    cert = edge.describe_connect_error(untrusted, TLS_BROKER)
    assert "unable to get local issuer certificate" in cert and "--tls-ca" in cert


def test_a_hang_up_before_the_answer_hints_at_tls() -> None:
    assert "--tls-ca" in edge.describe_hang_up(BROKER)
    assert "--tls-ca" not in edge.describe_hang_up(TLS_BROKER)


def test_a_refused_login_names_the_settings_to_check() -> None:
    broker = edge.BrokerAddress("hub.local", 8883, edge.Credentials(username="pi-01"))
    error = edge.LoginRefused(broker, "Not authorized", 3)
    assert "pi-01" in str(error) and "Not authorized" in str(error)
    assert "--username" in str(error) and "--password-file" in str(error)
    assert isinstance(error, RuntimeError)  # the CLI's one line, exit 2


def test_a_state_directory_is_locked_by_one_holder_at_a_time(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    held = lock_directory(directory)  # creates the directory
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    assert (directory / "lock").read_text().strip() == holder
    with pytest.raises(DirectoryLocked) as refused:
        lock_directory(directory)  # another open file: flock refuses, even in this process
    assert str(directory) in str(refused.value) and holder in str(refused.value)
    assert isinstance(refused.value, RuntimeError)  # the CLI's one line, exit 2
    held.release()
    lock_directory(directory).release()


def test_the_default_node_state_directory_is_per_federation_and_node() -> None:
    assert default_state_dir("lab", "pi-01") == Path(".fedmq-node") / "lab" / "pi-01"
    assert default_state_dir("lab", "pi-01") != default_state_dir("lab", "pi-02")
    assert default_state_dir("lab", "pi-01") != default_state_dir("other", "pi-01")
    for odd in (".", ".."):
        with pytest.raises(ValueError, match="--state-dir"):
            default_state_dir("lab", odd)


def test_a_node_takes_its_state_from_the_old_default_directory(tmp_path: Path) -> None:
    import dataclasses

    from fedmq.node import last_update
    from fedmq.node.app import adopt_old_state
    from fedmq.schemas import encode
    from tests.golden.samples import FEDERATION, NODE, UPDATE

    old = tmp_path / ".fedmq-node"
    old.mkdir()
    mine = last_update.LastUpdate(UPDATE.round, UPDATE.base_model_id, encode(UPDATE))
    last_update.save(old / "last_update.msgpack", mine)
    (old / "residual.npz").write_bytes(b"residual")
    new = old / FEDERATION / NODE
    # another node's (or federation's) record stays where it is
    assert not adopt_old_state(old, old / FEDERATION / "other", federation=FEDERATION,
                               node_id="other")  # fmt: skip
    assert not adopt_old_state(old, old / "x" / NODE, federation="x", node_id=NODE)
    assert (old / "last_update.msgpack").exists()
    assert adopt_old_state(old, new, federation=FEDERATION, node_id=NODE)
    assert last_update.load(new / "last_update.msgpack") == mine
    assert (new / "residual.npz").read_bytes() == b"residual"
    assert not (old / "last_update.msgpack").exists() and not (old / "residual.npz").exists()
    # a directory that already has a record keeps it
    last_update.save(old / "last_update.msgpack", dataclasses.replace(mine, round=9))
    assert not adopt_old_state(old, new, federation=FEDERATION, node_id=NODE)
    assert last_update.load(new / "last_update.msgpack") == mine


def test_a_state_directory_that_is_a_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="Not a directory") as refused:
        lock_directory(path)
    assert str(path) in str(refused.value)
