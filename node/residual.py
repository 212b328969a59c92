"""The error-feedback residual on a node's disk, so it survives a restart.

``residual.npz`` in the node's state directory (node.saved_tensors): the residual
tensors plus the round and compression SPEC they belong to. In rounds (sync mode) a
residual is reused only for the round right after the one that made it, with the same
SPEC and layout; otherwise it is stale (the node missed rounds or a new run began) and is
discarded. In asynchronous mode a node skips the versions made while it trains, so its
residual carries over to any later version (still discarded for an earlier one: a new
run), as docs/PROTOCOL.md documents. A new residual waits as ``residual.next.npz`` until its
round's update is on record (``settle``).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.node import saved_tensors
from fedmq.node.saved_tensors import promote, settle
from fedmq.schemas.tensors import Shapes

__all__ = ["SavedResidual", "load", "promote", "save", "settle"]


@dataclass(frozen=True)
class SavedResidual:
    round: int
    spec: str
    residual: dict[str, np.ndarray]

    def usable_for(
        self, round: int, spec: str, layout: Shapes, *, skips: bool = False
    ) -> str | None:
        """None if this residual may be added to round ``round``'s delta, else why not.
        ``skips``: versions may be skipped (asynchronous mode), any later one will do."""
        if spec != self.spec:
            return f"made for compression {self.spec!r}, now {spec!r}"
        if skips and round <= self.round:
            return f"made in version {self.round}, not before this version {round} (a new run)"
        if not skips and round != self.round + 1:
            return f"made in round {self.round}, this is round {round}"
        if {k: v.shape for k, v in self.residual.items()} != layout:
            return "made for another parameter layout"
        return None


def save(path: Path, saved: SavedResidual) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    saved_tensors.save(path, saved_tensors.SavedTensors(saved.round, saved.spec, saved.residual))


def load(path: Path) -> SavedResidual | None:
    """The saved residual, or None if there is none or it cannot be read."""
    saved = saved_tensors.load(path)
    return None if saved is None else SavedResidual(saved.round, saved.tag, saved.tensors)
