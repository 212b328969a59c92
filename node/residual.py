"""The error-feedback residual on a node's disk, so it survives a restart.

One .npz file in the node's state directory: the residual tensors plus the round, model
layout and compression SPEC they belong to. A residual is reused only for the round right
after the one that made it, with the same SPEC and layout; otherwise it is stale (the node
missed rounds or a new run began) and is discarded, as docs/PROTOCOL.md documents.

A new residual is first written as ``residual.next.npz`` and becomes ``residual.npz``
only once its round's update is on record (node.last_update): see ``settle``.
"""

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.files import fsync_directory, write_atomically
from fedmq.schemas.tensors import Shapes


@dataclass(frozen=True)
class SavedResidual:
    round: int
    spec: str
    residual: dict[str, np.ndarray]

    def usable_for(self, round: int, spec: str, layout: Shapes) -> str | None:
        """None if this residual may be added to round ``round``'s delta, else why not."""
        if spec != self.spec:
            return f"made for compression {self.spec!r}, now {spec!r}"
        if round != self.round + 1:
            return f"made in round {self.round}, this is round {round}"
        if {k: v.shape for k, v in self.residual.items()} != layout:
            return "made for another parameter layout"
        return None


def save(path: Path, saved: SavedResidual) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    meta = json.dumps({"round": saved.round, "spec": saved.spec, "names": list(saved.residual)})
    arrays = {f"t{i}": array for i, array in enumerate(saved.residual.values())}
    arrays["meta"] = np.array(meta)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_atomically(path, buffer.getvalue())


def load(path: Path) -> SavedResidual | None:
    """The saved residual, or None if there is none or it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            residual = {
                name: archive[f"t{i}"].astype(np.float32) for i, name in enumerate(meta["names"])
            }
        return SavedResidual(round=int(meta["round"]), spec=str(meta["spec"]), residual=residual)
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def promote(pending: Path, path: Path) -> None:
    """Make the pending residual the current one (after its update went on record)."""
    pending.replace(path)
    fsync_directory(path.parent)


def settle(pending: Path, path: Path, on_record: int | None) -> None:
    """At start-up (``on_record``: the round of the update on record, if any): a pending
    residual whose round's update is on record was about to be promoted when the node
    stopped, so promote it; any other pending one belongs to an update that never went
    on record (that round is trained again, from the current residual), so drop it."""
    if not pending.exists():
        return
    waiting = load(pending)
    if waiting is not None and waiting.round == on_record:
        promote(pending, path)
    else:
        pending.unlink()
