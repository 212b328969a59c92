"""A deployment's credentials: ``fedmq broker init``, ``add-node`` and ``revoke-node``.

DeploymentFiles of a deployment directory DIR (docs/security.md explains each file):

    DIR/deployment.toml          what `init` was given (federation, host names, port, mTLS)
    DIR/mosquitto.conf           the broker's config (broker.production)
    DIR/ca/ca.crt, ca.key        the fleet's CA; ca.key signs certificates, keep it offline
    DIR/broker/server.crt, .key  the broker's TLS certificate and key
    DIR/broker/passwords         mosquitto password_file: every node, aggregator, monitor
    DIR/broker/acl               mosquitto acl_file (broker.acl)
    DIR/nodes/<id>/              one bundle per node (broker.bundle), to copy to the device
    DIR/aggregator/, DIR/monitor/  the role accounts' bundles

Secrets (keys, passwords, password file) are mode 0600 and their directories 0700;
every other file is 0644 and DIR itself 0755. Each mode is set explicitly, whatever the
umask.
"""

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedmq.broker import bundle, certs, passwords
from fedmq.broker.acl import AGGREGATOR, MONITOR, ROLES, render_acl
from fedmq.broker.bridge import Bridge, render_bridge
from fedmq.broker.process import PROJECT_CONF
from fedmq.broker.production import ListenerFiles, render_production
from fedmq.models import get_model
from fedmq.schemas.messages import packet_bound
from fedmq.schemas.topics import validate_name

STATE = "deployment.toml"


def _write_public(path: Path, text: str) -> None:
    """A file that holds no secret: mode 0644 whatever the umask."""
    path.write_text(text)
    path.chmod(0o644)


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """What ``init`` was given, kept in DIR/deployment.toml for ``add-node``."""

    federation: str
    hostnames: tuple[str, ...]
    tls_port: int = 8883
    listen: str | None = None  # None: every interface
    mtls: bool = False


@dataclass(frozen=True)
class DeploymentFiles:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def config(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def listener_files(self) -> ListenerFiles:
        broker = self.root / "broker"
        return ListenerFiles(
            passwords=broker / "passwords",
            acl=broker / "acl",
            ca_cert=self.ca_cert,
            server_cert=broker / "server.crt",
            server_key=broker / "server.key",
        )

    def bundle_dir(self, username: str) -> Path:
        return self.root / username if username in ROLES else self.root / "nodes" / username


def node_id(text: str) -> str:
    """A node id that may have an account: a legal id, not a role's name."""
    validate_name("node id", text)
    if text in (".", ".."):  # a legal topic level, but not a bundle directory's name
        raise ValueError(f"node id {text!r} cannot name a bundle directory")
    if text in ROLES:
        raise ValueError(f"node id {text!r} is reserved for the {text} account")
    return text


def _save_state(layout: DeploymentFiles, deployment: Deployment) -> None:
    q = json.dumps
    text = "\n".join(
        [
            "# fedmq deployment, written by `fedmq broker init`; read by add-node/revoke-node.",
            f"federation = {q(deployment.federation)}",
            f"hostnames = [{', '.join(q(h) for h in deployment.hostnames)}]",
            f"tls_port = {deployment.tls_port}",
            f"listen = {q(deployment.listen or '')}",
            f"mtls = {str(deployment.mtls).lower()}",
        ]
    )
    _write_public(layout.state, text + "\n")


def load_deployment(root: Path) -> Deployment:
    layout = DeploymentFiles(root.resolve())
    if not layout.state.exists():
        raise ValueError(f"{root} is not a deployment directory (no {STATE}): run init first")
    with layout.state.open("rb") as file:
        data = tomllib.load(file)
    return Deployment(
        federation=validate_name("federation id", data["federation"]),
        hostnames=tuple(data["hostnames"]),
        tls_port=int(data["tls_port"]),
        listen=data.get("listen") or None,
        mtls=bool(data["mtls"]),
    )


def _write_bundle(
    layout: DeploymentFiles, deployment: Deployment, username: str, password: str
) -> Path:
    """The account's bundle directory, written anew."""
    target = layout.bundle_dir(username)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True, mode=0o700)
    target.chmod(0o700)
    passwords.write_secret(target / bundle.PASSWORD, password + "\n")
    shutil.copyfile(layout.ca_cert, target / bundle.CA)
    (target / bundle.CA).chmod(0o644)
    cert = key = None
    if deployment.mtls:
        cert, key = target / bundle.CERT, target / bundle.KEY
        certs.make_leaf(
            cert, key, ca_cert=layout.ca_cert, ca_key=layout.ca_key, common_name=username
        )
    role = username if username in ROLES else "node"
    settings = bundle.Bundle(
        role=role,
        federation=deployment.federation,
        node_id=None if role != "node" else username,
        host=deployment.hostnames[0],
        port=deployment.tls_port,
        username=username,
        password_file=target / bundle.PASSWORD,
        ca_file=target / bundle.CA,
        cert_file=cert,
        key_file=key,
    )
    _write_public(target / bundle.CONFIG, bundle.render(settings))
    return target


def _add_accounts(layout: DeploymentFiles, deployment: Deployment, usernames: list[str]) -> None:
    files = layout.listener_files
    entries = passwords.parse(files.passwords.read_text()) if files.passwords.exists() else {}
    for username in usernames:
        password = passwords.new_password()
        _write_bundle(layout, deployment, username, password)
        entries[username] = passwords.hash_password(password)
    passwords.write_secret(files.passwords, passwords.render(entries))
    bundle.set_fleet(layout.bundle_dir(AGGREGATOR) / bundle.CONFIG, nodes_of(layout.root))


def init_deployment(
    root: Path,
    *,
    nodes: list[str],
    federation: str = "default",
    hostnames: list[str],
    tls_port: int = 8883,
    listen: str | None = None,
    mtls: bool = False,
    model: str = "digits-mlp",
    project_conf: Path = PROJECT_CONF,
    bridge: Bridge | None = None,
) -> Deployment:
    """Create everything in ``root`` (which must not hold a deployment yet). ``bridge``:
    a site broker's (``fedmq broker init --site``, broker.bridge): the root's model comes
    in through it, and the site aggregator's account may read it (docs/hierarchy.md)."""
    layout = DeploymentFiles(root.resolve())
    if layout.state.exists():
        raise ValueError(f"{root} already holds a deployment: add or revoke nodes instead")
    for node in nodes:
        node_id(node)
    if not hostnames:
        raise ValueError("give at least one --hostname that devices use to reach the broker")
    certs.subject_alt_names(hostnames)  # fail on a bad name before writing anything
    deployment = Deployment(
        federation=validate_name("federation id", federation),
        hostnames=tuple(hostnames),
        tls_port=tls_port,
        listen=listen,
        mtls=mtls,
    )
    files = layout.listener_files
    config = render_production(
        project_conf.read_text(),
        files=files,
        port=tls_port,
        listen=listen,
        mtls=mtls,
        max_packet_size=packet_bound(get_model(model).num_params),
    )
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.root.chmod(0o755)
    for private in (layout.ca_key.parent, files.server_key.parent, layout.root / "nodes"):
        private.mkdir(mode=0o700, exist_ok=True)
        private.chmod(0o700)  # mkdir's mode is masked by the umask, and an old one stays
    certs.make_ca(layout.ca_cert, layout.ca_key, name=f"fedmq {federation} CA")
    certs.make_leaf(
        files.server_cert,
        files.server_key,
        ca_cert=layout.ca_cert,
        ca_key=layout.ca_key,
        common_name=hostnames[0],
        server_names=hostnames,
    )
    _write_public(files.acl, render_acl(federation, site=bridge is not None))
    _add_accounts(layout, deployment, [AGGREGATOR, MONITOR, *sorted(set(nodes))])
    if bridge is None:
        _write_public(layout.config, config)
    else:  # the bridge's password, if any, is in it: not for everyone's eyes
        passwords.write_secret(layout.config, config + render_bridge(bridge))
    _save_state(layout, deployment)
    return deployment


def nodes_of(root: Path) -> list[str]:
    """The node accounts in the password file."""
    entries = passwords.parse(DeploymentFiles(root.resolve()).listener_files.passwords.read_text())
    return sorted(name for name in entries if name not in ROLES)


def add_node(root: Path, node: str) -> Path:
    """Give ``node`` an account and a bundle; returns the bundle directory."""
    layout = DeploymentFiles(root.resolve())
    deployment = load_deployment(root)
    node_id(node)
    if node in nodes_of(root):
        raise ValueError(f"node {node!r} already has an account: revoke it first to reissue")
    _add_accounts(layout, deployment, [node])
    return layout.bundle_dir(node)


def revoke_node(root: Path, node: str) -> None:
    """Remove ``node``'s password (and its bundle). After SIGHUP mosquitto refuses its
    connections and disconnects it if connected. A client certificate it holds stays
    valid but is useless without a password."""
    layout = DeploymentFiles(root.resolve())
    load_deployment(root)
    node_id(node)
    files = layout.listener_files
    entries = passwords.parse(files.passwords.read_text())
    if node not in entries:
        raise ValueError(f"node {node!r} has no account")
    del entries[node]
    passwords.write_secret(files.passwords, passwords.render(entries))
    bundle.set_fleet(layout.bundle_dir(AGGREGATOR) / bundle.CONFIG, nodes_of(layout.root))
    shutil.rmtree(layout.bundle_dir(node), ignore_errors=True)


def reload_hint(root: Path) -> str:
    config = DeploymentFiles(root.resolve()).config
    return (
        "reload the running broker so it re-reads the password and ACL files: "
        f"`systemctl reload mosquitto` or `kill -HUP <pid of mosquitto -c {config}>`"
    )
