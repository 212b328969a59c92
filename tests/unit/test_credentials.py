"""Password hashes, ACL rules, the generated broker config and bundles, without a broker
(tests/integration/test_security.py starts one with these files)."""

import argparse
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq import cli, config
from fedmq.broker import acl, bundle, credentials, passwords
from fedmq.broker.process import PROJECT_CONF, render_config
from fedmq.broker.production import MARKER
from tests.unit.test_broker import settings_of

# ---- password hashes ------------------------------------------------------------------------


def test_a_generated_entry_verifies_by_recomputing_pbkdf2():
    password = passwords.new_password()
    hashed = passwords.hash_password(password)
    assert hashed.startswith(f"$7${passwords.ITERATIONS}$")
    assert passwords.verify(hashed, password)
    assert not passwords.verify(hashed, password + "x")
    assert hashed != passwords.hash_password(password)  # a fresh salt each time


def test_known_answer():
    salt = bytes(range(12))
    hashed = passwords.hash_password("secret", salt=salt, iterations=101)
    assert hashed.split("$")[:4] == ["", "7", "101", "AAECAwQFBgcICQoL"]
    assert passwords.verify(hashed, "secret")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_entries_of_mosquitto_passwd_verify(tmp_path: Path):
    """Same format both ways: what mosquitto_passwd writes, our verify accepts."""
    file = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(file), "alice", "s3cret"], check=True)
    [hashed] = passwords.parse(file.read_text()).values()
    assert passwords.verify(hashed, "s3cret")
    assert not passwords.verify(hashed, "S3cret")


@pytest.mark.parametrize(
    "hashed",
    ["", "$6$abc$def", "$7$x$AAECAwQFBgcICQoL$AA==", "$7$101$AAEC$AA==", "$7$0$AAECAwQFBgcICQoL$"
     + "A" * 88, "$7$101$!!$AA==", "$7$101$AAECAwQFBgcICQoL"],
)  # fmt: skip
def test_malformed_hashes_never_verify(hashed: str):
    assert not passwords.verify(hashed, "")


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_password_round_trips(password: str):
    assert passwords.verify(passwords.hash_password(password), password)


def test_password_file_round_trip_and_refuses_bad_usernames():
    entries = {"pi-02": "$7$1$a$b", "aggregator": "$7$1$c$d"}
    text = passwords.render(entries)
    assert text.splitlines()[1:] == ["aggregator:$7$1$c$d", "pi-02:$7$1$a$b"]
    assert passwords.parse(text) == entries
    for bad in ["a:b", "", "#x", " x", "a\nb"]:
        with pytest.raises(ValueError):
            passwords.render({bad: "h"})


def test_secrets_are_written_0600(tmp_path: Path):
    target = tmp_path / "d" / "secret"
    passwords.write_secret(target, "one")
    passwords.write_secret(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["secret"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_adding_a_node_keeps_the_password_files_owner(deployment: Path, tmp_path: Path):
    # The Pi guide gives the broker's files to the mosquitto user; add-node run as root
    # rewrote the password file as root's 0600, and the next reload refused every client.
    root = tmp_path / "copy"
    shutil.copytree(deployment, root)
    password_file = credentials.DeploymentFiles(root).listener_files.passwords
    os.chown(password_file, 4321, 4322)
    credentials.add_node(root, "pi-03")
    credentials.revoke_node(root, "pi-01")
    owner = password_file.stat()
    assert (owner.st_uid, owner.st_gid) == (4321, 4322)
    assert stat.S_IMODE(owner.st_mode) == 0o600


# ---- ACL -----------------------------------------------------------------------------------


def test_acl_table():
    text = acl.render_acl("f1")
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules[:4] == [
        "pattern write fedmq/f1/updates/%u",
        "pattern write fedmq/f1/status/%u",
        "pattern read fedmq/f1/global",
        "pattern read fedmq/f1/global/delta",
    ]
    aggregator = rules[rules.index("user aggregator") + 1 : rules.index("user monitor")]
    assert aggregator[:2] == ["topic deny fedmq/f1/updates/aggregator",
                              "topic deny fedmq/f1/status/aggregator"]  # fmt: skip
    assert "topic read $SYS/broker/publish/messages/dropped" in aggregator
    assert {r for r in aggregator if r.startswith("topic write")} == {
        f"topic write fedmq/f1/{t}" for t in ("global", "global/delta", "server", "metrics")
    }
    monitor = rules[rules.index("user monitor") + 1 :]
    assert [r for r in monitor if " write " in r or " readwrite " in r] == []
    assert monitor[:2] == [
        "topic deny fedmq/f1/updates/monitor",
        "topic deny fedmq/f1/status/monitor",
    ]


def test_acl_lines_are_what_mosquitto_parses():
    # mosquitto splits on single spaces and reads a topic to the end of the line
    for line in acl.render_acl("f.1_x-2").splitlines():
        if line and not line.startswith("#"):
            keyword, *rest = line.split(" ")
            assert keyword in ("pattern", "topic", "user") and rest and "" not in rest


# ---- a deployment --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dep") / "fedmq"
    credentials.init_deployment(
        root, nodes=["pi-02", "pi-01"], federation="farm", hostnames=["broker.lan", "10.0.0.5"]
    )
    return root


def test_init_writes_every_file(deployment: Path):
    layout = credentials.DeploymentFiles(deployment)
    files = layout.listener_files
    for path in [layout.config, layout.state, layout.ca_cert, layout.ca_key, *vars(files).values()]:
        assert path.is_file(), path
    secret = [layout.ca_key, files.server_key, files.passwords]
    for name in ["aggregator", "monitor", "pi-01", "pi-02"]:
        directory = layout.bundle_dir(name)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        secret.append(directory / bundle.PASSWORD)
        assert not (directory / bundle.KEY).exists()  # no --mtls
    for path in secret:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert credentials.nodes_of(deployment) == ["pi-01", "pi-02"]


def test_bundles_hold_working_passwords(deployment: Path):
    files = credentials.DeploymentFiles(deployment).listener_files
    entries = passwords.parse(files.passwords.read_text())
    assert set(entries) == {"aggregator", "monitor", "pi-01", "pi-02"}
    for name, hashed in entries.items():
        settings = bundle.load(credentials.DeploymentFiles(deployment).bundle_dir(name))
        assert passwords.verify(hashed, settings.password_file.read_text().strip())
        assert settings.username == name
        assert (settings.host, settings.port, settings.federation) == ("broker.lan", 8883, "farm")
        assert (
            settings.ca_file.read_bytes()
            == credentials.DeploymentFiles(deployment).ca_cert.read_bytes()
        )
        assert settings.node_id == (None if name in acl.ROLES else name)
        assert settings.role == (name if name in acl.ROLES else "node")


def test_the_server_certificate_names_every_host(deployment: Path):
    cert = credentials.DeploymentFiles(deployment).listener_files.server_cert
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:broker.lan" in text and "IP Address:10.0.0.5" in text
    assert "TLS Web Server Authentication" in text


def test_generated_config_enables_the_production_listener(deployment: Path):
    text = credentials.DeploymentFiles(deployment).config.read_text()
    found = settings_of(text)
    project = settings_of(PROJECT_CONF.read_text())
    files = credentials.DeploymentFiles(deployment).listener_files
    assert found["listener"] == ["1883 127.0.0.1", "8883"]
    assert found["allow_anonymous"] == ["false", "false"]  # loopback and TLS
    assert found["password_file"] == [str(files.passwords)] * 2
    assert found["acl_file"] == [str(files.acl)] * 2
    assert found["use_username_as_clientid"] == ["true", "true"]
    assert found["certfile"] == [str(files.server_cert)]
    assert found["keyfile"] == [str(files.server_key)]
    assert found["cafile"] == [str(files.ca_cert)]
    assert found["tls_version"] == ["tlsv1.2"]
    assert found["require_certificate"] == ["false"]
    assert found["per_listener_settings"] == ["true"]
    # everything else is the project's
    security = {"listener", "allow_anonymous", "password_file", "acl_file", "certfile",
                "keyfile", "cafile", "tls_version", "require_certificate",
                "use_username_as_clientid", "max_packet_size"}  # fmt: skip
    assert {k: v for k, v in found.items() if k not in security} == {
        k: v for k, v in project.items() if k not in security
    }
    # every setting has its comment, as in the project's file
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert lines[number - 1].startswith("#"), line
    # `fedmq broker --config` (render_config) moves the loopback listener, not the TLS one
    assert settings_of(render_config(text, 4242))["listener"] == ["4242 127.0.0.1", "8883"]


def test_the_projects_production_section_is_disabled():
    head, _, tail = PROJECT_CONF.read_text().partition(MARKER)
    assert tail and settings_of(MARKER + tail) == {}  # nothing enabled after the marker
    assert "/etc/fedmq/broker/passwords" in tail
    assert settings_of(head)["allow_anonymous"] == ["true"]


def test_add_and_revoke(deployment: Path, tmp_path: Path):
    root = tmp_path / "copy"
    shutil.copytree(deployment, root)
    target = credentials.add_node(root, "pi-03")
    assert bundle.load(target).node_id == "pi-03"
    assert credentials.nodes_of(root) == ["pi-01", "pi-02", "pi-03"]
    acl_before = credentials.DeploymentFiles(root).listener_files.acl.read_text()
    with pytest.raises(ValueError, match="already"):
        credentials.add_node(root, "pi-03")
    credentials.revoke_node(root, "pi-02")
    assert credentials.nodes_of(root) == ["pi-01", "pi-03"]
    assert not credentials.DeploymentFiles(root).bundle_dir("pi-02").exists()
    assert (
        credentials.DeploymentFiles(root).listener_files.acl.read_text() == acl_before
    )  # patterns
    with pytest.raises(ValueError, match="no account"):
        credentials.revoke_node(root, "pi-02")
    for bad in ["aggregator", "monitor", "a/b", "+", "", ".", ".."]:
        with pytest.raises(ValueError):
            credentials.add_node(root, bad)


def test_init_refuses_to_overwrite_and_bad_input(deployment: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="already holds"):
        credentials.init_deployment(deployment, nodes=["x"], hostnames=["h"])
    for nodes, hostnames in [(["monitor"], ["h"]), (["a:b"], ["h"]), (["n"], []), (["n"], ["a b"])]:
        with pytest.raises(ValueError):
            credentials.init_deployment(tmp_path / "d", nodes=nodes, hostnames=hostnames)
        assert not (tmp_path / "d" / credentials.STATE).exists()


def test_bundle_loading_names_the_bad_key(tmp_path: Path):
    (tmp_path / bundle.CONFIG).write_text('[connection]\nbroker = "h"\n[node]\nnode_id = "n"\n')
    with pytest.raises(ValueError, match=r"connection\.broker must be HOST:PORT"):
        bundle.load(tmp_path)
    (tmp_path / bundle.CONFIG).write_text('[connection]\nbroker = "h:1"\n')
    with pytest.raises(ValueError, match=r"exactly one of \[node\]"):
        bundle.load(tmp_path)


def test_the_brokers_packet_limit_is_derived_from_the_model(deployment: Path, tmp_path: Path):
    from fedmq.models import get_model
    from fedmq.schemas.messages import packet_bound, update_bound

    small = (deployment / "mosquitto.conf").read_text()
    assert f"\nmax_packet_size {packet_bound(get_model('digits-mlp').num_params)}\n" in small
    credentials.init_deployment(
        tmp_path / "large", nodes=["pi-01"], hostnames=["h"], model="digits-mlp-large"
    )
    large = (tmp_path / "large" / "mosquitto.conf").read_text()
    bound = packet_bound(get_model("digits-mlp-large").num_params)
    assert f"\nmax_packet_size {bound}\n" in large
    assert large.count("\nmax_packet_size ") == 1
    # the aggregator's own decoding bound is inside the broker's
    assert update_bound(get_model("digits-mlp-large").num_params) < bound


# ---- the aggregator bundle knows the fleet -------------------------------------------------


def _aggregator_settings(root: Path) -> argparse.Namespace:
    """What `fedmq aggregator --config DIR/aggregator/fedmq.toml` runs with."""
    path = credentials.DeploymentFiles(root).bundle_dir("aggregator") / bundle.CONFIG
    return config.parse_args(cli.build_parser(), ["aggregator", "--config", str(path)], {})


def test_the_aggregator_bundle_sets_the_fleet(deployment: Path):
    """It set neither, so the aggregator waited for 10 nodes from any id (issue 11)."""
    settings = _aggregator_settings(deployment)
    assert settings.node_ids == ("pi-01", "pi-02")
    assert settings.nodes == 2


def test_adding_and_revoking_nodes_updates_the_aggregator_bundle(deployment: Path, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(deployment, root)
    toml = credentials.DeploymentFiles(root).bundle_dir("aggregator") / bundle.CONFIG
    toml.write_text(toml.read_text() + "rounds = 50  # the operator's own line\n")
    credentials.add_node(root, "pi-03")
    settings = _aggregator_settings(root)
    assert (settings.node_ids, settings.nodes, settings.rounds) == (
        ("pi-01", "pi-02", "pi-03"),
        3,
        50,
    )
    credentials.revoke_node(root, "pi-01")
    settings = _aggregator_settings(root)
    assert (settings.node_ids, settings.nodes, settings.rounds) == (("pi-02", "pi-03"), 2, 50)
    assert toml.read_text().count("node_ids =") == 1


def test_setting_the_fleet_keeps_the_rest_of_the_file(tmp_path: Path):
    path = tmp_path / bundle.CONFIG
    path.write_text(
        '[connection]\nbroker = "h:8883"\n\n[aggregator]\nnodes = 9\nmodel = "mlp:8-16-3"\n'
        'node_ids = ["old"]\n\n[monitor]\n'
    )
    bundle.set_fleet(path, ["b", "a"])
    text = path.read_text()
    assert 'model = "mlp:8-16-3"' in text and "[monitor]" in text
    assert "nodes = 9" not in text and '"old"' not in text
    assert 'nodes = 2\nnode_ids = ["a", "b"]\n' in text
    assert text.index("[aggregator]") < text.index("node_ids") < text.index("[monitor]")


def _modes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode)
        for path in [root, *sorted(root.rglob("*"))]
    }


def _intended(relative: str, is_dir: bool) -> int:
    """Secrets 0600 in 0700 directories; everything else 0644, the top directory 0755."""
    if is_dir:
        return 0o755 if relative == "." else 0o700
    name = Path(relative).name
    return (
        0o600 if name in ("ca.key", "server.key", "passwords", "password", "client.key") else 0o644
    )


def test_init_sets_every_mode_whatever_the_umask(tmp_path: Path):
    # issue 11: under umask 000, init wrote its directory 0777 and mosquitto.conf 0666
    root = tmp_path / "fedmq"
    previous = os.umask(0)
    try:
        credentials.init_deployment(
            root, nodes=["pi-01"], federation="farm", hostnames=["broker.lan"], mtls=True
        )
        credentials.add_node(root, "pi-02")
    finally:
        os.umask(previous)
    modes = _modes(root)
    assert {"mosquitto.conf", "deployment.toml", "ca/ca.key", "nodes/pi-02/client.key"} <= set(
        modes
    )
    wrong = {
        relative: f"{mode:o}"
        for relative, mode in modes.items()
        if mode != _intended(relative, (root / relative).is_dir())
    }
    assert wrong == {}
