"""MQTT 3.1.1 PUBLISH packets (QoS 0 and 1) cut out of bytes read ahead from a socket.

paho reads a packet with three calls or more (its first byte, each byte of its length,
then the rest) and turns each PUBLISH into an ``MQTTMessage`` through its decoder,
debug log call, callback matcher and locks: ~40 µs per dense update when the aggregator
spent ~200 in all (bench/README.md, fourth pass; ~100 since the sixth), where its
``recv`` calls are ~4 µs. Here the
PUBLISH packets at the start of a buffer are cut out in one pass; everything else (a
CONNACK, SUBACK, PUBACK, PINGRESP, a QoS 2 PUBLISH, anything malformed) is left where
it is, for paho to read from the same buffer (``fedmq.mqtt.Client``), so paho keeps
every other part of the protocol and every error path as it was.
"""

from typing import NamedTuple

_PUBLISH = 0x30  # the first byte's packet type (high nibble)


class Publish(NamedTuple):
    topic: str
    payload: bytes
    retain: bool
    mid: int  # 0 at QoS 0
    qos: int


def fixed_header(buffer: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, int] | None:
    """The size of the fixed header of the packet at ``start`` and its remaining length,
    or None if the buffer does not hold that header yet. A remaining length of more than
    four bytes (malformed) gives (0, 0): not a packet to cut; paho reads it and says why."""
    end = len(buffer)
    remaining, shift, at = 0, 0, start + 1
    while at < end:
        byte = buffer[at]
        remaining |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return at - start, remaining
        shift += 7
        if shift > 21:
            return 0, 0
    return None


def cut_publishes(buffer: bytearray, limit: int) -> tuple[list[Publish], int, bool]:
    """The whole QoS 0 and 1 PUBLISH packets at the start of ``buffer`` (at most
    ``limit``), how many bytes they take, and whether a whole packet of another kind
    follows them (for paho to read). Cutting stops at the first packet that is not
    whole, not such a PUBLISH, or not well formed (an empty topic, one that is not
    UTF-8, lengths that do not fit): paho reads that one as it always has."""
    found: list[Publish] = []
    at, end = 0, len(buffer)
    with memoryview(buffer) as view:
        while len(found) < limit and at < end:
            header = fixed_header(view, at)
            if header is None or at + header[0] + header[1] > end:
                return found, at, False  # not whole yet: more bytes to come
            size, remaining = header
            first = view[at]
            qos = (first >> 1) & 0x03
            if first & 0xF0 != _PUBLISH or qos > 1 or size == 0 or remaining < 2:
                return found, at, True
            body, stop = at + size, at + size + remaining
            topic_end = body + 2 + ((view[body] << 8) | view[body + 1])
            payload_start = topic_end + 2 * qos
            if topic_end == body + 2 or payload_start > stop:
                return found, at, True  # paho's decoder refuses it
            try:
                topic = str(view[body + 2 : topic_end], "utf-8")
            except UnicodeDecodeError:
                return found, at, True
            mid = (view[topic_end] << 8) | view[topic_end + 1] if qos else 0
            found.append(
                Publish(topic, view[payload_start:stop].tobytes(), bool(first & 1), mid, qos)
            )
            at = stop
    return found, at, False
