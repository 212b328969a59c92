"""A node's personal parameters on its disk (``Task.personal``): trained here, never sent.

``personal.npz`` in the node's state directory (node.saved_tensors): the personal tensors
as the node's last trained round left them, tagged with the task fingerprint of that
round's global model. They carry over to every later round of the run, also after missed
rounds (a head does not go stale the way an error-feedback residual does), and wait as
``personal.next.npz`` until their round's update is on record, so a restarted node
resends or retrains exactly what an uninterrupted one would.
"""

from fedmq.node.saved_tensors import SavedTensors
from fedmq.schemas.tensors import Shapes

FILE = "personal.npz"
PENDING = "personal.next.npz"


def usable(
    saved: SavedTensors | None, *, round_number: int, fingerprint: str, layout: Shapes
) -> str | None:
    """None if ``saved`` may be this round's personal parameters, else why not (then the
    node starts them again from the task's init)."""
    if saved is None:
        return "none saved"
    if saved.tag != fingerprint:
        return "made for another task or layout of the shared parameters"
    if saved.round >= round_number:
        return f"made in round {saved.round}, not before this round {round_number} (a new run)"
    if {name: array.shape for name, array in saved.tensors.items()} != dict(layout):
        return "made for another layout of the personal parameters"
    return None
