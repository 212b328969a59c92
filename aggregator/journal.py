"""The accepted updates trained on the open model version, on disk, so an aggregator
crash loses none of them.

One append-only file per model version, ``journal-<version>.log`` (a version's number is
its ``round`` on the wire): the updates trained on that version, which the next version
is made from. A sequence of records, each

    u32 length (big-endian) | u32 CRC-32 of the body | body

where the body is msgpack ``[topic, payload]``: the update exactly as it arrived. The
aggregator appends every accepted update, and the MQTT edge calls ``sync`` (one fsync for
all updates handled since the last one: group commit) before it sends their PUBACKs, so
an update the broker has stopped holding for us is always on disk. A crash can leave a
torn last record; reading stops there and the file is cut back to its last whole record.
"""

import os
import struct
import zlib
from pathlib import Path

import msgpack
import structlog

from fedmq.files import fsync_directory

log = structlog.get_logger()

_HEADER = struct.Struct(">II")
_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")
# A record longer than this is corruption, not an update (the broker's packet limit).
MAX_RECORD = 64 * 1024 * 1024 + 1024
WRITE_BUFFER = 1 << 20


def journal_path(directory: Path, version: int) -> Path:
    """The journal of the updates trained on model version ``version``."""
    return directory / f"journal-{version:06d}.log"


def encode_record(topic: str, payload: bytes) -> bytes:
    return b"".join(record_parts(topic, payload))


def record_parts(topic: str, payload: bytes) -> tuple[bytes, bytes]:
    """A record as its head (length, CRC-32, the body's msgpack up to the payload's bytes)
    and the payload itself, so a caller writes the update without copying it into a
    body first: the bytes ``encode_record`` joins, as msgpack ``[topic, payload]`` is."""
    prefix = _topic_head(topic) + _length_head(len(payload), _BIN)
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    return _HEADER.pack(len(prefix) + len(payload), crc) + prefix, payload


# msgpack's type codes of the 8-, 16- and 32-bit length forms; str has a fixstr below 32
_STR, _BIN = b"\xd9\xda\xdb", b"\xc4\xc5\xc6"
_FIXSTR = 0xA0


def _length_head(n: int, codes: bytes, fix: int | None = None) -> bytes:
    """The msgpack header of a str or bin of ``n`` bytes: ``fix | n`` below 32 if the
    type has such a form, else the shortest of ``codes``' three length forms."""
    if fix is not None and n < 32:
        return bytes((fix | n,))
    if n < 1 << 8:
        return bytes((codes[0], n))
    if n < 1 << 16:
        return codes[1:2] + _U16.pack(n)
    return codes[2:3] + _U32.pack(n)


def _topic_head(topic: str) -> bytes:
    """The body's msgpack up to its payload: a 2-array and ``topic`` as a str, written
    here as ``msgpack.packb`` would (which makes a Packer, with its 256 KiB buffer, each
    call)."""
    data = topic.encode()
    return b"\x92" + _length_head(len(data), _STR, _FIXSTR) + data


def decode_records(data: bytes) -> tuple[list[tuple[str, bytes]], int]:
    """The whole records at the start of ``data`` and the length they cover.

    Stops at the first incomplete or corrupt record (a torn write from a crash)."""
    records: list[tuple[str, bytes]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if length > MAX_RECORD or end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        try:
            topic, payload = msgpack.unpackb(data[start:end], raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            break
        if not isinstance(topic, str) or not isinstance(payload, bytes):
            break
        records.append((topic, payload))
        offset = end
    return records, offset


class VersionJournal:
    """Appends the accepted updates of one model version; ``sync`` makes them durable."""

    def __init__(self, directory: Path, version: int) -> None:
        self.path = journal_path(directory, version)
        self.version = version  # the model version these updates were trained on
        existed = self.path.exists()
        # Records collect in a 1 MiB buffer until ``sync`` (a dense update is larger than
        # the default 8 KiB, which would cost a write call per record); nothing unsynced
        # was acknowledged, so what a crash loses in it the broker sends again.
        self._file = self.path.open("ab", buffering=WRITE_BUFFER)
        self._dirty = False
        self.appended = 0
        if not existed:
            fsync_directory(directory)

    def append(self, topic: str, payload: bytes) -> None:
        head, body = record_parts(topic, payload)
        self._file.write(head)
        self._file.write(body)
        self._dirty = True
        self.appended += 1

    def sync(self) -> bool:
        """fsync what was appended since the last call; True if there was anything."""
        if not self._dirty:
            return False
        self._file.flush()
        os.fsync(self._file.fileno())
        self._dirty = False
        return True

    def close(self) -> None:
        self.sync()
        self._file.close()


def read_journal(path: Path) -> list[tuple[str, bytes]]:
    """The records of a journal file, cutting off a torn tail in place."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, length = decode_records(data)
    if length < len(data):
        log.warning("journal.torn_tail", path=str(path), kept=length, dropped=len(data) - length)
        with path.open("r+b") as file:
            file.truncate(length)
            os.fsync(file.fileno())
    return records
