"""``fedmq export``: the newest global model kept in an aggregator's state directory, out
as a model file (fedmq.model_file).

It reads ``checkpoint.msgpack`` without taking the directory's lock, so it works while
the aggregator runs. That read is never torn: the aggregator never writes into a
checkpoint file, it writes a new file, fsyncs it and renames it over the old name
(fedmq.aggregator.checkpoint), so the one open() here gets the old file or the new one,
whole, and keeps reading that file even if a newer one replaces it meanwhile. And the
global model inside is decoded with its ``model_id`` (the hash of its tensors) checked.
"""

from pathlib import Path

from fedmq.aggregator.checkpoint import CHECKPOINT_FILE, from_bytes
from fedmq.model_file import ModelFile, ModelFileError, suffix_problem, write_model


def newest_global(state_dir: Path) -> bytes:
    """The global model message of the newest version kept in ``state_dir``;
    ModelFileError (one line, with what to do) if there is none."""
    if not state_dir.exists():
        raise ModelFileError(
            f"state directory {state_dir} does not exist: give the --state-dir the "
            "aggregator runs with (its default is ./.fedmq-aggregator)"
        )
    if not state_dir.is_dir():
        raise ModelFileError(f"{state_dir} is not a directory: give the aggregator's --state-dir")
    try:
        data = (state_dir / CHECKPOINT_FILE).read_bytes()  # one open(): one whole file
    except FileNotFoundError:
        raise ModelFileError(
            f"{state_dir} holds no model ({CHECKPOINT_FILE} is not there): give the "
            "--state-dir of an aggregator that has published its first model"
        ) from None
    return from_bytes(data).global_payload  # CheckpointError: one line


def export(state_dir: Path, out: Path) -> ModelFile:
    """Write the newest global model kept in ``state_dir`` to ``out`` (.msgpack or .npz)."""
    problem = suffix_problem(out)
    if problem is not None:  # before reading anything
        raise ModelFileError(f"--out {out}: {problem}")
    return write_model(out, newest_global(state_dir))
