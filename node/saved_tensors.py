"""Tensors a node keeps on its disk from one round to the next, crash-safe.

One .npz file in the node's state directory: named float arrays plus the round that made
them and a tag saying what they were made for (the error-feedback residual: the
compression SPEC; personal parameters: the task's fingerprint). Each kind decides for
itself when saved tensors may be used (``node.residual``, ``node.personal``).

New tensors are first written beside the current file (``*.next.npz``) and replace it
only once their round's update is on record (node.last_update): see ``settle``. So
whatever point a crash hits, the file matches the update on record.
"""

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.files import fsync_directory, write_atomically


@dataclass(frozen=True)
class SavedTensors:
    round: int
    tag: str  # what they were made for
    tensors: dict[str, np.ndarray]


def save(path: Path, saved: SavedTensors) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    # "spec" is the tag's key since the residual was the only kind (PROTOCOL 13.2)
    meta = json.dumps({"round": saved.round, "spec": saved.tag, "names": list(saved.tensors)})
    arrays = {f"t{i}": array for i, array in enumerate(saved.tensors.values())}
    arrays["meta"] = np.array(meta)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_atomically(path, buffer.getvalue())


def load(path: Path) -> SavedTensors | None:
    """The saved tensors (float32), or None if there are none or they cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            tensors = {
                name: archive[f"t{i}"].astype(np.float32) for i, name in enumerate(meta["names"])
            }
        return SavedTensors(round=int(meta["round"]), tag=str(meta["spec"]), tensors=tensors)
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def promote(pending: Path, path: Path) -> None:
    """Make the pending tensors the current ones (after their update went on record)."""
    pending.replace(path)
    fsync_directory(path.parent)


def settle(pending: Path, path: Path, on_record: int | None) -> None:
    """At start-up (``on_record``: the round of the update on record, if any): pending
    tensors whose round's update is on record were about to be promoted when the node
    stopped, so promote them; any other pending ones belong to an update that never went
    on record (that round is trained again, from the current tensors), so drop them."""
    if not pending.exists():
        return
    waiting = load(pending)
    if waiting is not None and waiting.round == on_record:
        promote(pending, path)
    else:
        pending.unlink()
