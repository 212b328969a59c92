"""Reading ahead of paho (``edge.Loop``): PUBLISH packets cut from large reads
(``fedmq.publish_reader``) give what paho's own reading gives, whatever the reads' sizes;
every other packet is still paho's, in order."""

import socket
import struct
import time

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq import mqtt as edge
from fedmq.publish_reader import Publish, cut_publishes, fixed_header


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str | bytes, payload: bytes, *, mid: int = 1, qos: int = 1,
            retain: bool = False, dup: bool = False) -> bytes:  # fmt: skip
    name = topic.encode() if isinstance(topic, str) else topic
    body = struct.pack("!H", len(name)) + name + (struct.pack("!H", mid) if qos else b"")
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([first]) + _length(len(body) + len(payload)) + body + payload


PINGRESP = b"\xd0\x00"


def unsuback(mid: int) -> bytes:
    return b"\xb0\x02" + struct.pack("!H", mid)


def test_a_publish_is_cut_as_paho_decodes_it() -> None:
    # paho's own decoder is the oracle; it is a private module that paho 2.0 does not have
    decode_publish = pytest.importorskip("paho.mqtt._packet").decode_publish
    for qos, retain, size in [(1, False, 10_000), (0, True, 3), (1, True, 0), (0, False, 200_000)]:
        packet = publish("fedmq/f/updates/n-1", bytes(range(256)) * (size // 256), mid=7,
                         qos=qos, retain=retain)  # fmt: skip
        found, used, other = cut_publishes(bytearray(packet), 10)
        size, remaining = fixed_header(packet) or (0, 0)
        paho = decode_publish(packet[0], packet[size:], mqtt.MQTTv311)
        assert used == len(packet) == size + remaining and not other
        assert found == [Publish(paho.topic.decode(), paho.payload, paho.retain, paho.mid, qos)]


def test_cutting_stops_where_a_packet_is_not_whole_or_not_a_publish() -> None:
    one, two = publish("a/b", b"x" * 300, mid=1), publish("a/c", b"y", mid=2)
    stream = one + two
    for cut in range(len(stream) + 1):
        found, used, other = cut_publishes(bytearray(stream[:cut]), 10)
        whole = [p for p, end in ((one, len(one)), (two, len(stream))) if end <= cut]
        assert len(found) == len(whole) and used == sum(map(len, whole)) and not other
    assert cut_publishes(bytearray(stream), 1)[:2] == ([Publish("a/b", b"x" * 300, False, 1, 1)],
                                                       len(one))  # fmt: skip
    for refused in [
        PINGRESP,
        unsuback(3),
        publish("a/b", b"x", qos=2),  # QoS 2: paho's PUBREC and PUBREL
        publish("", b"x"),  # empty topic: paho refuses it
        publish(b"\xff\xfe", b"x"),  # not UTF-8
        b"\x32\x01\x00",  # too short for its topic length
        b"\x32\xff\xff\xff\xff\x01",  # remaining length of five bytes
    ]:
        found, used, other = cut_publishes(bytearray(two + refused + one), 10)
        assert (len(found), used, other) == (1, len(two), True), refused


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 50_000), min_size=1, max_size=20),
)
def test_cut_in_any_reads_a_stream_gives_every_publish_once_in_order(
    sizes: list[int], cuts: list[int]
) -> None:
    messages = [Publish(f"t/{i}", bytes([i]) * size, i % 2 == 0, i + 1, i % 2)
                for i, size in enumerate(sizes)]  # fmt: skip
    stream = b"".join(publish(m.topic, m.payload, mid=m.mid, qos=m.qos, retain=m.retain)
                      for m in messages)  # fmt: skip
    buffer, got, at, turn = bytearray(), [], 0, 0
    while True:
        cut = cuts[turn % len(cuts)]
        turn += 1
        buffer += stream[at : at + cut]
        at += cut
        found, used, _ = cut_publishes(buffer, 3)  # at most 3 a turn
        del buffer[:used]
        got += found
        if at >= len(stream) and not found:
            break
    assert got == [m._replace(mid=m.mid if m.qos else 0) for m in messages] and not buffer


class _Wire:
    """An ``edge.Loop`` whose client's socket is one end of a socket pair; the test
    writes the broker's bytes into the other end."""

    def __init__(self, read_ahead: int) -> None:
        self.inbox = edge.Batch()
        self.client = edge.make_client("fedmq:t:aggregator", inbox=self.inbox, manual_ack=True)
        self.client.READ_AHEAD = read_ahead
        ours, self.broker = socket.socketpair()
        ours.setblocking(False)
        self.client._sock = ours
        self.loop = edge.Loop(self.client, self.inbox)
        self.disconnects = 0

        def on_disconnect(*_: object) -> None:
            self.disconnects += 1

        self.client.on_disconnect = on_disconnect

    def close(self) -> None:
        self.broker.close()
        if self.client._sock is not None:
            self.client._sock.close()


@pytest.fixture
def wire():  # type: ignore[no-untyped-def]
    made: list[_Wire] = []

    def make(read_ahead: int = 256 * 1024) -> _Wire:
        made.append(_Wire(read_ahead))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.mark.parametrize("read_ahead", [1, 5, 100, 4096, 256 * 1024])
def test_the_loop_reads_publishes_and_leaves_other_packets_to_paho_in_order(
    wire, read_ahead: int
) -> None:  # type: ignore[no-untyped-def]
    w = wire(read_ahead)
    stream = [
        publish("fedmq/t/updates/a", b"a" * 10_000, mid=1),
        PINGRESP,
        publish("fedmq/t/status/a", b"on", qos=0, retain=True),
        unsuback(9),  # paho's: make_client keeps it as an UNSUBACK that came early
        publish("fedmq/t/updates/b", b"b" * 200, mid=2),
        publish("fedmq/t/updates/c", b"c" * 70_000, mid=3),
    ]
    w.broker.sendall(b"".join(stream))
    deadline = time.monotonic() + 10
    while len(w.inbox) < 4 and time.monotonic() < deadline:
        w.loop.run(0.1)
    assert w.loop.take() == [
        edge.Received("fedmq/t/updates/a", b"a" * 10_000, False, mid=1, qos=1),
        edge.Received("fedmq/t/status/a", b"on", True, mid=0, qos=0),
        edge.Received("fedmq/t/updates/b", b"b" * 200, False, mid=2, qos=1),
        edge.Received("fedmq/t/updates/c", b"c" * 70_000, False, mid=3, qos=1),
    ]
    assert w.client.settled_early == {9}  # the UNSUBACK, read by paho between them
    assert w.client._in_packet["command"] == 0 and not w.client._ahead
    assert not w.client._out_packet  # manual acknowledgement: no PUBACK yet


def test_half_a_packet_waits_for_the_rest_without_blocking(wire) -> None:  # type: ignore[no-untyped-def]
    w = wire()
    packet = publish("fedmq/t/updates/a", b"a" * 5000, mid=4)
    w.broker.sendall(packet[:3000])
    w.loop.run(0.05)
    assert w.loop.take() == [] and len(w.client._ahead) == 3000  # EAGAIN after the part
    w.loop.run(0.05)  # nothing new: select times out
    w.broker.sendall(packet[3000:])
    w.loop.run(1.0)
    assert [r.mid for r in w.loop.take()] == [4]


def test_whole_packets_read_ahead_are_taken_without_waiting_for_the_socket(wire) -> None:  # type: ignore[no-untyped-def]
    """select does not wake for bytes already read: a turn stopped by its limit leaves
    whole packets ahead, and the next turn takes them at once."""
    w = wire()
    w.broker.sendall(b"".join(publish("fedmq/t/updates/a", b"x", mid=m) for m in range(1, 6)))
    w.loop.run(1.0, limit=2)
    assert [r.mid for r in w.loop.take()] == [1, 2]
    started = time.monotonic()
    w.loop.run(5.0, limit=2)
    w.loop.run(5.0)
    assert [r.mid for r in w.loop.take()] == [3, 4, 5]
    assert time.monotonic() - started < 1.0


def test_a_connection_that_ends_mid_packet_is_lost_as_paho_would_lose_it(wire) -> None:  # type: ignore[no-untyped-def]
    w = wire()
    w.broker.sendall(publish("fedmq/t/updates/a", b"x", mid=1) + b"\x32\x40\x00")
    w.broker.close()
    w.loop.run(1.0)
    assert [r.mid for r in w.loop.take()] == [1]
    assert w.client.socket() is None and w.disconnects == 1
