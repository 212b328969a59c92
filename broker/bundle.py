"""A credential bundle: what one device (or the aggregator, or a monitor) needs to reach
the broker, in one directory ready to copy to it.

    fedmq.toml    broker host and TLS port, federation, node id, the paths below
    ca.crt        the fleet's CA certificate, to verify the broker
    password      the account's password, one line (mode 0600)
    client.crt    with mutual TLS: this account's certificate (CN = username)
    client.key    with mutual TLS: its private key (mode 0600)

Paths in fedmq.toml are relative to the directory fedmq.toml is in, so the directory can
be moved as a whole (e.g. to /etc/fedmq/node on the device).
"""

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

CONFIG = "fedmq.toml"
CA = "ca.crt"
PASSWORD = "password"
CERT = "client.crt"
KEY = "client.key"


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A bundle's settings with absolute paths; ``node_id`` is None for the roles."""

    role: str
    federation: str
    node_id: str | None
    host: str
    port: int
    username: str
    password_file: Path
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


def render(bundle: Bundle) -> str:
    """fedmq.toml's text; paths are written as names relative to the bundle directory."""

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    lines = [
        f"# fedmq {bundle.role} credentials, written by `fedmq broker`. Relative paths are",
        "# relative to this file's directory. Keep `password` and `client.key` secret.",
        f"role = {q(bundle.role)}",
        f"federation = {q(bundle.federation)}",
    ]
    if bundle.node_id is not None:
        lines.append(f"node_id = {q(bundle.node_id)}")
    lines += [
        "",
        "[broker]",
        f"host = {q(bundle.host)}",
        f"port = {bundle.port}",
        f"username = {q(bundle.username)}",
        f"password_file = {q(bundle.password_file.name)}",
        f"ca_file = {q(bundle.ca_file.name)}",
    ]
    if bundle.cert_file is not None and bundle.key_file is not None:
        lines += [
            f"cert_file = {q(bundle.cert_file.name)}",
            f"key_file = {q(bundle.key_file.name)}",
        ]
    return "\n".join(lines) + "\n"


def load(path: Path) -> Bundle:
    """Read a bundle's fedmq.toml (or the directory holding it); paths made absolute.
    Raises ValueError naming the missing or wrong key."""
    path = path / CONFIG if path.is_dir() else path
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    base = path.resolve().parent
    broker = data.get("broker")
    if not isinstance(broker, dict):
        raise ValueError(f"{path}: no [broker] table")

    def text(table: dict[str, object], key: str, *, optional: bool = False) -> str | None:
        value = table.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: {key} must be a non-empty string")
        return value

    def file(key: str) -> Path | None:
        name = text(broker, key, optional=key in ("cert_file", "key_file"))
        return None if name is None else base / name

    port = broker.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{path}: broker.port must be a port number")
    cert, key = file("cert_file"), file("key_file")
    if (cert is None) != (key is None):
        raise ValueError(f"{path}: cert_file and key_file go together")
    return Bundle(
        role=str(text(data, "role")),
        federation=str(text(data, "federation")),
        node_id=text(data, "node_id", optional=True),
        host=str(text(broker, "host")),
        port=port,
        username=str(text(broker, "username")),
        password_file=base / str(text(broker, "password_file")),
        ca_file=base / str(text(broker, "ca_file")),
        cert_file=cert,
        key_file=key,
    )
