"""The aggregator's state when a model version was published, written atomically, plus
the journal of the updates trained on it.

A model version's number is its ``round`` on the wire (and in the file, below).
``checkpoint.msgpack`` holds what a restarted aggregator needs to carry on exactly where
it stopped: the open version's global model message as published (the params, round,
model id and plan are in it), its compact form, the metrics of every version made so far
(one per closed round), the participants whose updates made the open version (to
recognise resent duplicates), a fingerprint of the settings that must not change
within a run, with a server optimiser other than FedAvg, that optimiser's state
after the update that made the open version (``aggregator.optimizer``), when the run
started (``elapsed`` in metrics) and, in asynchronous mode, the versions updates may
still be trained on and each node's newest version in a made model
(``aggregator.buffer``). It is written to a temporary file, fsynced, renamed over the
old one and the directory fsynced: a crash leaves the old or the new checkpoint, never
a mix. The updates accepted on the open version are in its journal
(``aggregator.journal``); a journal of an older version than the checkpoint's is
obsolete. The checkpoints of the last ``KEEP_CHECKPOINTS`` versions are kept beside it
(``checkpoint-<version>.msgpack``) for ``StateDir.rollback`` (``--rollback-to``).
"""

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq.aggregator.journal import VersionJournal, journal_path, read_journal
from fedmq.aggregator.policy import Opened
from fedmq.files import fsync_directory, write_atomically
from fedmq.schemas import RoundMetrics, SchemaError, decode_metrics, encode

CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.msgpack"


class CheckpointError(RuntimeError):
    """The state directory cannot be resumed (unreadable, or another run's)."""


@dataclass(frozen=True)
class Checkpoint:
    version: int  # the model version published (its round, also inside global_payload)
    fingerprint: dict[str, Any]  # settings a run must keep (federation, model, plan)
    global_payload: bytes  # the version's GlobalModel message, as published
    delta_payload: bytes | None  # its compact form on global/delta
    delta_bytes: int | None  # size of the XOR form (None if there was no previous model)
    history: list[bytes]  # RoundMetrics messages of the versions made before, in order
    previous_reporters: list[str]  # whose updates made this version
    # The server optimiser's state arrays (aggregator.optimizer.state_leaves), None for
    # FedAvg, which keeps none: then the key is not written (the file as before).
    optimizer_state: list[np.ndarray] | None = None
    started_at: float | None = None  # wall clock when the run started; None: not kept
    # Asynchronous mode only (None otherwise, and the keys are not written): the versions
    # an update may still be trained on, and each node's newest version in a made model.
    recent: dict[int, Opened] | None = None
    latest: dict[str, int] | None = None
    # A site aggregator only (docs/hierarchy.md; None otherwise, and the keys are not
    # written): its update for the root's round, once sent (resent after a restart), and
    # its upstream compression's error-feedback residual, after that update if sent.
    upstream: bytes | None = None
    residual: dict[str, np.ndarray] | None = None
    # --downlink-compression with ef (None otherwise, and the key is not written): what
    # the compressed downlink has not sent yet (aggregator.downlink), after this version.
    downlink_residual: dict[str, np.ndarray] | None = None
    # DP-FedAvg with clip=adaptive only (None otherwise, and the key is not written): the
    # clip the next version uses, where adaptive clipping moved it.
    dp_fedavg_clip: float | None = None
    # The final model's delivery, once counted (--final-delivery-wait; None otherwise, and
    # the key is not written): (bytes the nodes reported, None if none; nodes counted).
    final_downlink: tuple[int | None, int] | None = None


# Numeric dtypes a state array may have in a checkpoint (optax state: floats, a count).
_STATE_KINDS = "biuf"


def encode_state_array(array: np.ndarray) -> dict[str, Any]:
    """A state array as a tensor map of PROTOCOL section 6, any numeric dtype, little-endian."""
    dtype = array.dtype.newbyteorder("<")
    if dtype.kind not in _STATE_KINDS:
        raise ValueError(f"a {array.dtype} array cannot be checkpointed")
    contiguous = np.asarray(array, dtype=dtype, order="C")
    return {"dtype": dtype.str, "shape": list(contiguous.shape), "data": contiguous.tobytes()}


def decode_state_array(raw: Any) -> np.ndarray:
    """``encode_state_array``'s map back to a (writable) array; ValueError if malformed."""
    dtype = np.dtype(str(raw["dtype"]))
    shape = tuple(int(size) for size in raw["shape"])
    if dtype.kind not in _STATE_KINDS or any(size < 0 for size in shape):
        raise ValueError(f"state array of dtype {dtype} and shape {list(shape)}")
    data = bytes(raw["data"])
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"state array of {len(data)} bytes for {dtype}{list(shape)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def to_bytes(checkpoint: Checkpoint) -> bytes:
    content: dict[str, Any] = {
        "v": CHECKPOINT_VERSION,
        "round": checkpoint.version,
        "fingerprint": checkpoint.fingerprint,
        "global": checkpoint.global_payload,
        "global_delta": checkpoint.delta_payload,
        "delta_bytes": checkpoint.delta_bytes,
        "history": checkpoint.history,
        "previous_reporters": checkpoint.previous_reporters,
    }
    if checkpoint.optimizer_state is not None:
        content["server_optimizer_state"] = [
            encode_state_array(array) for array in checkpoint.optimizer_state
        ]
    if checkpoint.started_at is not None:
        content["started_at"] = checkpoint.started_at
    if checkpoint.recent is not None:
        content["recent"] = {
            str(version): [
                opened.model_id,
                None if opened.selected is None else list(opened.selected),
            ]
            for version, opened in sorted(checkpoint.recent.items())
        }
    if checkpoint.latest is not None:
        content["latest"] = dict(sorted(checkpoint.latest.items()))
    if checkpoint.upstream is not None:
        content["upstream"] = checkpoint.upstream
    if checkpoint.residual is not None:
        content["residual"] = {
            name: encode_state_array(array) for name, array in checkpoint.residual.items()
        }
    if checkpoint.downlink_residual is not None:
        content["downlink_residual"] = {
            name: encode_state_array(array) for name, array in checkpoint.downlink_residual.items()
        }
    if checkpoint.dp_fedavg_clip is not None:
        content["dp_fedavg_clip"] = checkpoint.dp_fedavg_clip
    if checkpoint.final_downlink is not None:
        content["final_downlink"] = list(checkpoint.final_downlink)
    return msgpack.packb(content, use_bin_type=True)


def _recent(raw: Any) -> dict[int, Opened] | None:
    if raw is None:
        return None
    return {
        int(version): Opened(str(model_id), None if selected is None else tuple(selected))
        for version, (model_id, selected) in raw.items()
    }


def _latest(raw: Any) -> dict[str, int] | None:
    return None if raw is None else {str(node): int(version) for node, version in raw.items()}


def _final_downlink(raw: Any) -> tuple[int | None, int] | None:
    if raw is None:
        return None
    delivered, nodes = raw
    return (None if delivered is None else int(delivered)), int(nodes)


def from_bytes(data: bytes) -> Checkpoint:
    try:
        raw = msgpack.unpackb(data, raw=False)
        if raw.get("v") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint version {raw.get('v')!r}, expected 1")
        state = raw.get("server_optimizer_state")  # absent: FedAvg, or before optimisers
        return Checkpoint(
            version=int(raw["round"]),
            fingerprint=dict(raw["fingerprint"]),
            global_payload=bytes(raw["global"]),
            delta_payload=None if raw["global_delta"] is None else bytes(raw["global_delta"]),
            delta_bytes=raw["delta_bytes"],
            history=[bytes(item) for item in raw["history"]],
            previous_reporters=[str(node) for node in raw["previous_reporters"]],
            optimizer_state=None if state is None else [decode_state_array(a) for a in state],
            started_at=None if raw.get("started_at") is None else float(raw["started_at"]),
            recent=_recent(raw.get("recent")),
            latest=_latest(raw.get("latest")),
            upstream=None if raw.get("upstream") is None else bytes(raw["upstream"]),
            residual=None
            if raw.get("residual") is None
            else {str(name): decode_state_array(a) for name, a in raw["residual"].items()},
            downlink_residual=None
            if raw.get("downlink_residual") is None
            else {str(name): decode_state_array(a) for name, a in raw["downlink_residual"].items()},
            dp_fedavg_clip=None
            if raw.get("dp_fedavg_clip") is None
            else float(raw["dp_fedavg_clip"]),
            final_downlink=_final_downlink(raw.get("final_downlink")),
        )
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as error:
        raise CheckpointError(f"unreadable checkpoint: {error}") from error


# The metrics a round's model or its nodes' reports decide, which may come out NaN or
# Inf (a diverged model's test loss): sent and kept as nil, their names in ``non_finite``.
NULLABLE_METRICS = ("accuracy", "loss", "train_loss", "train_seconds_median")


def nil_non_finite(wire: dict[str, Any]) -> dict[str, Any]:
    """A metrics map with NaN and Inf in ``NULLABLE_METRICS`` replaced by nil, and the
    names of those fields in ``non_finite`` (absent when there were none)."""
    bad = sorted(
        key
        for key in NULLABLE_METRICS
        if isinstance(wire.get(key), float) and not math.isfinite(wire[key])
    )
    if not bad:
        return wire
    return {**wire, **dict.fromkeys(bad), "non_finite": bad}


def read_history(history: list[bytes]) -> tuple[list[RoundMetrics], list[bytes]]:
    """The closed rounds' metrics of a checkpoint, decoded, and their wire form.

    Checkpoints written before the aggregator sent non-finite metrics as nil may hold
    NaN there (a diverged model's test loss): such an entry is read with them as nil, and
    its wire form rewritten so, rather than refusing the run. Anything else unreadable
    is a CheckpointError."""
    decoded: list[RoundMetrics] = []
    wire: list[bytes] = []
    for index, payload in enumerate(history, start=1):
        try:
            try:
                decoded.append(decode_metrics(payload))
                wire.append(payload)
                continue
            except SchemaError as error:
                if error.reason != "non_finite":
                    raise
            raw = msgpack.unpackb(payload, raw=False)
            payload = msgpack.packb(nil_non_finite(raw), use_bin_type=True)
            decoded.append(decode_metrics(payload))
            wire.append(payload)
        except (SchemaError, ValueError, TypeError, msgpack.UnpackException) as error:
            raise CheckpointError(
                f"unreadable checkpoint: metrics of closed round {index}: {error}"
            ) from error
    return decoded, wire


def metrics_payload(metrics: RoundMetrics) -> tuple[RoundMetrics, bytes]:
    """``metrics`` with non-finite values as nil (``nil_non_finite``), and its bytes."""
    bad = sorted(
        key
        for key in NULLABLE_METRICS
        if isinstance(getattr(metrics, key), float) and not math.isfinite(getattr(metrics, key))
    )
    if bad:
        changes: dict[str, Any] = dict.fromkeys(bad)
        changes["extra"] = {**metrics.extra, "non_finite": bad}
        metrics = replace(metrics, **changes)
    return metrics, encode(metrics)


def ways_out(keep: str) -> str:
    """The end of every refusal to resume: how to continue, discard, or start beside."""
    return (
        f"start with {keep} to continue it, add --fresh to discard it, "
        f"or give another --state-dir to start a new run beside it"
    )


def changed_setting(directory: Path, option: str, kept: Any, new: Any) -> str:
    """One line: a setting a run must keep was changed (the message of a refusal)."""
    return (
        f"{option} {new} does not match the run kept in {directory}, which uses "
        f"{option} {kept}: {ways_out(f'{option} {kept}')}"
    )


# Checkpoints kept for --rollback-to: the default run's 30 rounds, so any round of it can be
# gone back to. checkpoint.msgpack is a hard link to the newest (no second write); each
# holds the model, its compact form and the metrics so far: 30 of them measured 1 MB for
# digits-mlp and 21 MB for digits-mlp-large (compact form as large as the model).
KEEP_CHECKPOINTS = 30
_KEPT = re.compile(r"checkpoint-(\d{6})\.msgpack")


class StateDir:
    """An aggregator's durable state: the checkpoint, the open version's journal and the
    checkpoints of the last ``keep`` versions (``checkpoint-<version>.msgpack``).

    ``checkpoint.msgpack`` is the run's state; a kept checkpoint of a later version than
    it is left over from versions a rollback discarded (or from a crash just before the
    switch to it) and is deleted on the next resume or save."""

    def __init__(self, directory: Path, *, keep: int = KEEP_CHECKPOINTS) -> None:
        self.directory = directory
        self.keep = keep
        directory.mkdir(parents=True, exist_ok=True)
        self._journal: VersionJournal | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def kept_path(self, version: int) -> Path:
        return self.directory / f"checkpoint-{version:06d}.msgpack"

    def kept_versions(self) -> list[int]:
        """The versions whose checkpoints are kept, in order."""
        found = (_KEPT.fullmatch(path.name) for path in self.directory.iterdir())
        return sorted(int(match[1]) for match in found if match)

    def load(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        return from_bytes(self.checkpoint_path.read_bytes())

    def load_kept(self, version: int) -> Checkpoint | None:
        path = self.kept_path(version)
        return from_bytes(path.read_bytes()) if path.exists() else None

    def clear(self) -> None:
        """Forget the kept run: the next start is a new one."""
        self.close()
        kept = [self.kept_path(version) for version in self.kept_versions()]
        for path in [self.checkpoint_path, *kept, *self.directory.glob("journal-*.log")]:
            path.unlink(missing_ok=True)

    def rollback(self, version: int) -> None:
        """Make the kept checkpoint of ``version`` the run's state, and forget the
        versions after it: their kept checkpoints and journals, and ``version``'s own
        journal (its round starts again from its model). Crash-safe: the journal goes
        first (a crash then leaves the old state without it), then ``checkpoint.msgpack``
        is switched atomically; the later versions' files left by a crash after that
        are stale, and dropped at the next resume or save (``forget_after``)."""
        kept = self.kept_path(version)
        data = kept.read_bytes()
        self.close()
        journal = journal_path(self.directory, version)
        if journal.exists():
            journal.unlink()
            fsync_directory(self.directory)
        self._point_at(kept, data)
        self.forget_after(version)

    def forget_after(self, version: int) -> None:
        """Delete the kept checkpoints of versions after ``version`` and the journals of
        other versions: left over from a rollback, or from a crash before a switch."""
        for later in self.kept_versions():
            if later > version:
                self.kept_path(later).unlink(missing_ok=True)
        for path in self.directory.glob("journal-*.log"):
            if path != journal_path(self.directory, version):
                path.unlink()

    def _point_at(self, kept: Path, data: bytes) -> None:
        """``checkpoint.msgpack`` := the content of ``kept``, atomically: a hard link
        renamed over it, or where links are not supported, a copy."""
        tmp = self.checkpoint_path.with_name(CHECKPOINT_FILE + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            os.link(kept, tmp)
        except OSError:
            write_atomically(self.checkpoint_path, data)
            return
        tmp.replace(self.checkpoint_path)
        fsync_directory(self.directory)

    def journal_records(self, version: int) -> list[tuple[str, bytes]]:
        return read_journal(journal_path(self.directory, version))

    def save(self, checkpoint: Checkpoint) -> None:
        """Checkpoint a newly published version (kept as ``checkpoint-<version>.msgpack``
        too), start its journal, drop older journals and checkpoints beyond the last ``keep``."""
        data = to_bytes(checkpoint)
        kept = self.kept_path(checkpoint.version)
        write_atomically(kept, data)
        self._point_at(kept, data)
        self.forget_after(checkpoint.version)
        for old in self.kept_versions():
            if old <= checkpoint.version - self.keep:
                self.kept_path(old).unlink(missing_ok=True)
        self.open_journal(checkpoint.version)

    def open_journal(self, version: int) -> None:
        if self._journal is not None and self._journal.version == version:
            return
        if self._journal is not None:
            self._journal.close()
        self._journal = VersionJournal(self.directory, version)
        for old in self.directory.glob("journal-*.log"):
            if old != self._journal.path:
                old.unlink()

    def append(self, topic: str, payload: bytes) -> None:
        if self._journal is None:
            raise RuntimeError("no open journal: save() or open_journal() first")
        self._journal.append(topic, payload)

    def sync(self) -> bool:
        return self._journal.sync() if self._journal is not None else False

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
