"""A credential bundle: what one device (or the aggregator, or a monitor) needs to reach
the broker, in one directory ready to copy to it.

    fedmq.toml    broker host and TLS port, federation, node id, the paths below
    ca.crt        the fleet's CA certificate, to verify the broker
    password      the account's password, one line (mode 0600)
    client.crt    with mutual TLS: this account's certificate (CN = username)
    client.key    with mutual TLS: its private key (mode 0600)

Paths in fedmq.toml are relative to the directory fedmq.toml is in, so the directory can
be moved as a whole (e.g. to /etc/fedmq/node on the device). The aggregator's fedmq.toml
also names the fleet (``set_fleet``).
"""

import json
import re
import tomllib
from collections.abc import Iterable
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


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def render(bundle: Bundle) -> str:
    """fedmq.toml's text, in the format of ``fedmq <role> --config`` (src/fedmq/config.py:
    a [connection] section and the role's own); paths are names relative to the bundle
    directory, which the config loader resolves against the file's directory."""
    q = _q
    lines = [
        f"# fedmq {bundle.role} credentials, written by `fedmq broker`. Use it as",
        f"#   fedmq {bundle.role} --config THIS_FILE",
        "# Relative paths are relative to this file's directory. Keep `password` and",
        "# `client.key` secret.",
        "",
        "[connection]",
        f"broker = {q(f'{bundle.host}:{bundle.port}')}",
        f"federation = {q(bundle.federation)}",
        f"username = {q(bundle.username)}",
        f"password_file = {q(bundle.password_file.name)}",
        f"tls_ca = {q(bundle.ca_file.name)}",
    ]
    if bundle.cert_file is not None and bundle.key_file is not None:
        lines += [
            f"tls_cert = {q(bundle.cert_file.name)}",
            f"tls_key = {q(bundle.key_file.name)}",
        ]
    lines += ["", f"[{bundle.role}]"]
    if bundle.node_id is not None:
        lines += [
            f"node_id = {q(bundle.node_id)}",
            "# Add this device's training data (an .npz with arrays x and y) and a state",
            "# directory, e.g.:",
            '# data = "/var/lib/fedmq-node/data.npz"',
            '# state_dir = "/var/lib/fedmq-node"',
        ]
    if bundle.role == "aggregator":
        lines += [
            "# The fleet (`fedmq broker add-node` and `revoke-node` rewrite nodes and node_ids):",
            "# a round waits for `nodes` updates, and updates from other ids are rejected.",
        ]
    return "\n".join(lines) + "\n"


# The [aggregator] keys that name the fleet: the options --nodes and --node-ids
# (src/fedmq/config.py: a key is the option's name with "_" for "-").
FLEET_KEYS = ("nodes", "node_ids")
_SECTION = re.compile(r"^\s*\[")
_FLEET_KEY = re.compile(rf"^\s*({'|'.join(FLEET_KEYS)})\s*=\s*(.*)$")


def set_fleet(path: Path, node_ids: Iterable[str]) -> None:
    """Make the aggregator's fedmq.toml at ``path`` expect exactly ``node_ids``: ``nodes``
    (updates a round waits for) and ``node_ids`` (updates from any other id are rejected),
    right after the [aggregator] header and its comments. Every other line is kept, so an
    operator's own settings survive add-node and revoke-node."""
    ids = sorted(set(node_ids))
    lines = path.read_text().splitlines()
    header = next(
        (i for i, line in enumerate(lines) if re.match(r"^\s*\[aggregator\]\s*(#.*)?$", line)),
        None,
    )
    if header is None:
        raise ValueError(f"{path}: no [aggregator] section")
    end = next((i for i in range(header + 1, len(lines)) if _SECTION.match(lines[i])), len(lines))
    body: list[str] = []
    open_array = False  # inside an old fleet key's multi-line array
    for line in lines[header + 1 : end]:
        if open_array:
            open_array = "]" not in line
            continue
        match = _FLEET_KEY.match(line)
        if match is None:
            body.append(line)
            continue
        value = match.group(2).lstrip()
        open_array = value.startswith("[") and "]" not in value
    comments = next(
        (i for i, line in enumerate(body) if not line.lstrip().startswith("#")), len(body)
    )
    # no nodes left: no fleet lines (nodes = 0 is not a setting the aggregator takes)
    fleet = [f"nodes = {len(ids)}", f"node_ids = [{', '.join(_q(i) for i in ids)}]"] if ids else []
    lines[header + 1 : end] = [*body[:comments], *fleet, *body[comments:]]
    path.write_text("\n".join(lines) + "\n")


def load(path: Path) -> Bundle:
    """Read a bundle's fedmq.toml (or the directory holding it); paths made absolute.
    Raises ValueError naming the missing or wrong key."""
    path = path / CONFIG if path.is_dir() else path
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    base = path.resolve().parent
    connection = data.get("connection")
    if not isinstance(connection, dict):
        raise ValueError(f"{path}: no [connection] table")
    roles = [role for role in ("node", "aggregator", "monitor") if role in data]
    if len(roles) != 1:
        raise ValueError(f"{path}: needs exactly one of [node], [aggregator], [monitor]")
    role = roles[0]

    def text(table: dict[str, object], key: str, *, optional: bool = False) -> str | None:
        value = table.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: {key} must be a non-empty string")
        return value

    def file(key: str) -> Path | None:
        name = text(connection, key, optional=key in ("tls_cert", "tls_key"))
        return None if name is None else base / name

    host, _, port_text = str(text(connection, "broker")).rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{path}: connection.broker must be HOST:PORT")
    cert, key = file("tls_cert"), file("tls_key")
    if (cert is None) != (key is None):
        raise ValueError(f"{path}: tls_cert and tls_key go together")
    return Bundle(
        role=role,
        federation=str(text(connection, "federation")),
        node_id=text(data[role], "node_id", optional=role != "node"),
        host=host,
        port=int(port_text),
        username=str(text(connection, "username")),
        password_file=base / str(text(connection, "password_file")),
        ca_file=base / str(text(connection, "tls_ca")),
        cert_file=cert,
        key_file=key,
    )
