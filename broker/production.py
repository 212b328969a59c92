"""The production mosquitto.conf of a deployment, derived from the project's file.

The project's mosquitto.conf carries the production listener as disabled ``#option value``
lines after the marker line below (explanations are ``# ...`` comments). The deployment's
config is the same text with (1) those lines enabled, their /etc/fedmq paths moved to
the deployment's directory, the listener's port and address and ``require_certificate``
set; (2) the loopback listener's ``allow_anonymous true`` replaced by the same password
and ACL files, so no listener of a deployed broker accepts anonymous clients. Every other
setting (queues, persistence, logging) is the project's, so the two cannot drift apart.
"""

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = "# ---- Production listener"
DEFAULT_ROOT = "/etc/fedmq"
_DISABLED = re.compile(r"^#([a-z_]+)( .*)?$")
_ANONYMOUS = "allow_anonymous true"
_MAX_PACKET = re.compile(r"^max_packet_size \d+$", re.MULTILINE)


@dataclass(frozen=True, kw_only=True)
class ListenerFiles:
    """Absolute paths the generated config names."""

    passwords: Path
    acl: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path


def render_production(
    project: str,
    *,
    files: ListenerFiles,
    port: int,
    listen: str | None,
    mtls: bool,
    max_packet_size: int | None = None,
) -> str:
    """The deployment's config text (see the module docstring)."""
    head, marker, tail = project.partition(MARKER)
    if not marker:
        raise ValueError(f"mosquitto.conf has no {MARKER!r} section")
    if head.count(f"\n{_ANONYMOUS}\n") != 1:
        raise ValueError(f"mosquitto.conf must have exactly one {_ANONYMOUS!r} line")
    for path in vars(files).values():
        if any(c in str(path) for c in "\n\r") or not Path(path).is_absolute():
            raise ValueError(f"{path} is not a usable absolute path")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    values = {
        "listener": f"{port} {listen}" if listen else str(port),
        "password_file": str(files.passwords),
        "acl_file": str(files.acl),
        "cafile": str(files.ca_cert),
        "certfile": str(files.server_cert),
        "keyfile": str(files.server_key),
        "require_certificate": "true" if mtls else "false",
    }
    enabled = []
    section = (marker + tail).replace("(disabled in this file)", "(enabled by fedmq broker init)")
    for line in section.splitlines():
        match = _DISABLED.match(line)
        if match:
            name = match.group(1)
            value = values.get(name, (match.group(2) or "").strip())
            line = f"{name} {value}"
        enabled.append(line)
    lockdown = "\n".join(
        [
            "# In a deployment (fedmq broker init), no anonymous clients here either.",
            "allow_anonymous false",
            "# The TLS listener's accounts (plain text is tolerable on loopback only), for an",
            "# aggregator or a monitor running on the broker's host.",
            f"password_file {files.passwords}",
            "# The TLS listener's ACLs.",
            f"acl_file {files.acl}",
            "# The client id becomes the username, as on the TLS listener.",
            "use_username_as_clientid true",
        ]
    )
    head = head.replace(f"\n{_ANONYMOUS}\n", f"\n{lockdown}\n")
    if max_packet_size is not None:  # derived from the deployment's model
        head, count = _MAX_PACKET.subn(
            f"# Derived from the model by fedmq broker init (schemas.messages.packet_bound).\n"
            f"max_packet_size {max_packet_size}",
            head,
        )
        if count != 1:
            raise ValueError("mosquitto.conf must have exactly one max_packet_size line")
    header = (
        "# Written by `fedmq broker init` from fedmq's mosquitto.conf: the production\n"
        "# listener at the end is enabled and the loopback listener locked down (no\n"
        "# anonymous clients). Run: mosquitto -c THIS_FILE; reload the password and ACL\n"
        "# files with SIGHUP (systemctl reload mosquitto). See docs/security.md.\n#\n"
    )
    return header + head + "\n".join(enabled) + "\n"
