"""mosquitto's $SYS statistics that fedmq reads, and their payloads.

mosquitto 2.0 (src/sys_tree.c) publishes each counter as decimal ASCII text, retained
with a message expiry of 60 s: once at its first ``sys_interval`` tick ("0"), then at a
later tick (1 s in the project's mosquitto.conf; 2.0.11 was seen to tick every 2 s with
it) only when the value has changed. So a new subscriber gets the current value from
the retained copy only if it changed within the last minute; on a broker whose counter
has been still for longer it gets nothing until the next change. ``$SYS/broker/version``
is retained without expiry: a subscriber that gets it knows the broker publishes $SYS,
and (subscribed after the counter, in the same SUBSCRIBE, whose retained messages
mosquitto sends filter by filter) that a missing counter means an unchanged one.
"""

# PUBLISH messages the broker dropped because a subscriber's queue was full
# (max_queued_messages / max_queued_bytes) since the broker started. Each one was
# acknowledged to its publisher and reached no one.
DROPPED = "$SYS/broker/publish/messages/dropped"

# "mosquitto version 2.0.11": retained, never expires; sent on every subscribe.
VERSION = "$SYS/broker/version"


def counts_drops(version: bytes) -> bool:
    """Whether the broker that sent this ``$SYS/broker/version`` is mosquitto, whose
    dropped counter a missing reading means unchanged (above). Another broker may publish
    $SYS without that counter (amqtt does): then nothing is known about drops."""
    return version.strip().lower().startswith(b"mosquitto")


# Longest counter accepted: 20 digits hold any unsigned 64-bit value.
_MAX_DIGITS = 20


def parse_counter(payload: bytes) -> int | None:
    """A $SYS counter's value, or None if ``payload`` is not one (empty, not decimal
    ASCII digits, signed, or longer than 20 digits). Surrounding whitespace is allowed."""
    text = payload.strip()
    if not 0 < len(text) <= _MAX_DIGITS or not all(0x30 <= byte <= 0x39 for byte in text):
        return None
    return int(text)
