"""A site broker's bridge to the root broker (mosquitto.conf(5), "Configuring Bridges").

A site of a hierarchical federation (docs/hierarchy.md) runs its own mosquitto; its
nodes and its site aggregator connect there. The root's model must reach them unchanged,
so the site broker bridges three topics **in** from the root broker: ``global`` (the
retained full model), ``global/delta`` (its compact form) and ``server`` (the root's
retained status). Nothing goes out through the bridge: the site aggregator sends its one
update per round to the root broker on its own connection (``aggregator.site_app``).

Choices, from mosquitto.conf(5):

- ``try_private true``: mosquitto tells the root mosquitto it is a bridge, and "retained
  messages will be propagated correctly": the root's global model arrives retained at the
  site broker, so a site node that (re)connects gets it at once, as from the root.
- ``cleansession false`` and a stable ``remote_clientid``: the root keeps the bridge's
  subscriptions across a dropped link. The models are QoS 0 at the root (docs/PROTOCOL.md
  1), so none are queued while the link is down; on reconnect the bridge subscribes
  again and the root sends the retained model, the newest.
- ``topic ... in 1``: subscribed at QoS 1; delivered at the lower of that and the
  publish's QoS (0 for the models, 1 for ``server``).
- ``restart_timeout 1 30``: reconnects back off with jitter from 1 s to 30 s.
- ``notifications_local_only true``: the bridge's up/down state is published (retained)
  on the site broker's ``$SYS/broker/connection/<remote_clientid>/state`` only.
"""

from dataclasses import dataclass
from pathlib import Path

from fedmq.schemas.topics import Topics, validate_name


@dataclass(frozen=True, kw_only=True)
class Bridge:
    """Where the root broker is and who the bridge is there."""

    federation: str
    site: str
    host: str
    port: int
    ca_file: Path | None = None  # the root broker's CA: TLS
    username: str | None = None  # the bridge's account at the root
    password: str | None = None  # mosquitto holds it in the config (remote_password)

    def __post_init__(self) -> None:
        validate_name("federation id", self.federation)
        validate_name("site name", self.site)
        if not 0 < self.port < 65536:
            raise ValueError(f"upstream port {self.port} is out of range")
        texts = [self.host, str(self.ca_file or ""), self.username or "", self.password or ""]
        if not self.host or any(c in text for text in texts for c in " \t\n\r#"):
            raise ValueError("upstream host, CA file, username and password may not hold spaces")
        if self.password is not None and self.username is None:
            raise ValueError("an upstream password needs an upstream username")

    @property
    def client_id(self) -> str:
        """The bridge's client id at the root (stable: its session is kept there)."""
        return f"fedmq-bridge.{self.federation}.{self.site}"


def bridged_topics(federation: str) -> list[str]:
    """The root's topics a site broker takes in: the models and the root's status."""
    topics = Topics(federation)
    return [topics.global_model, topics.global_delta, topics.server]


def render_bridge(bridge: Bridge) -> str:
    """The bridge section, to append at the end of the site broker's mosquitto.conf."""
    lines = [
        "",
        f"# ---- Bridge of site {bridge.site!r} to the root broker, written by fedmq broker init",
        "# --site: the root's global model (retained), its compact form and the root's",
        "# status come in; nothing goes out (the site aggregator sends its update to the",
        "# root itself). See docs/hierarchy.md and mosquitto.conf(5), Configuring Bridges.",
        f"connection fedmq-{bridge.site}",
        f"address {bridge.host}:{bridge.port}",
        "bridge_protocol_version mqttv311",
        "# mosquitto to mosquitto: retained messages arrive retained",
        "try_private true",
        "cleansession false",
        f"remote_clientid {bridge.client_id}",
        "start_type automatic",
        "restart_timeout 1 30",
        "notifications true",
        "notifications_local_only true",
    ]
    if bridge.ca_file is not None:
        lines += [f"bridge_cafile {bridge.ca_file}", "bridge_insecure false"]
    if bridge.username is not None:
        lines.append(f"remote_username {bridge.username}")
    if bridge.password is not None:
        lines.append(f"remote_password {bridge.password}")
    lines += [f"topic {topic} in 1" for topic in bridged_topics(bridge.federation)]
    return "\n".join(lines) + "\n"
