"""The broker's ACL file for one federation (mosquitto.conf(5), ``acl_file``).

Nodes are covered by ``%u`` pattern rules (username = node id), so adding or revoking a
node changes only the password file. The two role accounts, ``aggregator`` and
``monitor``, get ``user`` blocks. mosquitto applies pattern rules to every user, so each
role block first denies the two topics the node patterns would hand that role
(``updates/<role>`` and ``status/<role>``); in mosquitto 2.0 a user's own rules, denials
included, are checked before the patterns, and the first matching rule decides. Role
names are reserved: no node may be called ``aggregator`` or ``monitor`` in a deployment.

mosquitto checks ``read`` when it delivers a message, not when a client subscribes: a
node may subscribe to ``updates/+`` and is granted it, but receives nothing there.
"""

from fedmq.schemas.topics import ROOT, Topics

AGGREGATOR = "aggregator"
MONITOR = "monitor"
ROLES = (AGGREGATOR, MONITOR)
DROPPED = "$SYS/broker/publish/messages/dropped"  # as schemas.sys_topics.DROPPED
VERSION = "$SYS/broker/version"  # as schemas.sys_topics.VERSION


def rules(federation: str, *, site: bool = False) -> dict[str, list[tuple[str, str]]]:
    """Who may do what: ``"%u"`` (every node, by pattern) and each role -> (access, topic).
    ``site``: a site broker's (docs/hierarchy.md), whose aggregator reads the root's
    global model, bridged in, instead of writing one."""
    topics = Topics(federation)
    prefix = f"{ROOT}/{federation}"
    table = {
        "%u": [
            ("write", f"{prefix}/updates/%u"),
            ("write", f"{prefix}/status/%u"),
            ("read", topics.global_model),
            ("read", topics.global_delta),
        ],
        AGGREGATOR: [
            ("read", topics.all_updates),
            ("read", topics.all_status),
            ("read", DROPPED),
            ("read", VERSION),
            ("write", topics.global_model),
            ("write", topics.global_delta),
            ("write", topics.server),
            ("write", topics.metrics),
        ],
        MONITOR: [
            ("read", topics.all_status),
            ("read", topics.server),
            ("read", topics.metrics),
            ("read", topics.global_model),
        ],
    }
    if site:
        table[AGGREGATOR].append(("read", topics.global_model))
    return table


def render_acl(federation: str, *, site: bool = False) -> str:
    """The ACL file's text (``site``: see ``rules``)."""
    table = rules(federation, site=site)
    topics = Topics(federation)
    lines = [
        f"# fedmq ACL for federation {federation!r}, written by `fedmq broker init`.",
        "# Nothing is allowed unless a line below allows it (mosquitto.conf(5), acl_file).",
        "# Read is checked on delivery, write on publish; a denied publish is dropped",
        "# silently (MQTT 3.1.1 has no way to say no), a denied read never arrives.",
        "",
        "# ---- Nodes: username = node id; mosquitto replaces %u with the username.",
        "# A node publishes its own update and status (its last will included) and reads",
        "# the global model, full and compact. It cannot read other nodes' updates.",
    ]
    lines += [f"pattern {access} {topic}" for access, topic in table["%u"]]
    notes = {
        AGGREGATOR: "reads updates, status, the broker's drop counter and version; writes "
        "the global model, server status and metrics",
        MONITOR: "reads status, server status, metrics and the global model; writes nothing",
    }
    for role in ROLES:
        lines += [
            "",
            f"# ---- {role}: {notes[role]}.",
            "# The node patterns above apply to every user: take back what they would give",
            "# this account (its own updates/ and status/ topics). Checked before the patterns.",
            f"user {role}",
            f"topic deny {topics.update(role)}",
            f"topic deny {topics.status(role)}",
        ]
        lines += [f"topic {access} {topic}" for access, topic in table[role]]
    return "\n".join(lines) + "\n"
