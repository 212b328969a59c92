"""mosquitto's $SYS statistics that fedmq reads, and their payloads.

mosquitto 2.0 publishes each counter as decimal ASCII text, retained: once when it
starts ("0"), then at its ``sys_interval`` tick (1 s in the project's mosquitto.conf;
mosquitto 2.0.11 was seen to tick every 2 s with it) whenever the value has changed. A
new subscriber gets the current value at once, from the retained copy.
"""

# PUBLISH messages the broker dropped because a subscriber's queue was full
# (max_queued_messages / max_queued_bytes) since the broker started. Each one was
# acknowledged to its publisher and reached no one.
DROPPED = "$SYS/broker/publish/messages/dropped"

# Longest counter accepted: 20 digits hold any unsigned 64-bit value.
_MAX_DIGITS = 20


def parse_counter(payload: bytes) -> int | None:
    """A $SYS counter's value, or None if ``payload`` is not one (empty, not decimal
    ASCII digits, signed, or longer than 20 digits). Surrounding whitespace is allowed."""
    text = payload.strip()
    if not 0 < len(text) <= _MAX_DIGITS or not all(0x30 <= byte <= 0x39 for byte in text):
        return None
    return int(text)
