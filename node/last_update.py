"""A node's last submitted update on its disk, so a restarted node does not train again.

``last_update.msgpack`` in the state directory: the round, the base model id and the
update payload exactly as published. It is written (atomically) before the update is
published, so after a crash at any point the node either has nothing for that round
(and trains it) or resends the very same bytes, which the aggregator accepts once.
"""

from dataclasses import dataclass
from pathlib import Path

import msgpack

from fedmq.files import write_atomically

VERSION = 1


@dataclass(frozen=True)
class LastUpdate:
    round: int
    model_id: str
    payload: bytes


def save(path: Path, last: LastUpdate) -> None:
    data = msgpack.packb(
        {"v": VERSION, "round": last.round, "model_id": last.model_id, "payload": last.payload},
        use_bin_type=True,
    )
    write_atomically(path, data)


def load(path: Path) -> LastUpdate | None:
    """The saved update, or None if there is none or it cannot be read (then the node
    trains the round again: the aggregator rejects a second update as a duplicate)."""
    try:
        raw = msgpack.unpackb(path.read_bytes(), raw=False)
        if raw["v"] != VERSION:
            return None
        return LastUpdate(int(raw["round"]), str(raw["model_id"]), bytes(raw["payload"]))
    except (OSError, ValueError, TypeError, KeyError, msgpack.UnpackException):
        return None
