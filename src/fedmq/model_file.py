"""A trained model as a file: what ``fedmq export`` and ``fedmq aggregator --save-model``
write and ``fedmq.load_params`` reads. The file name's suffix chooses the format:

- ``.msgpack``: the global model message exactly as the aggregator published it
  (docs/PROTOCOL.md, section 8.1). A format already public and versioned, readable by
  ``fedmq.decode_global`` or any msgpack library in any language, and self-checking: its
  ``model_id`` is the hash of its tensors, checked on every load, so a damaged or edited
  file is refused rather than predicted with. It names its task, round and plan.
- ``.npz``: numpy's archive, for tools that know nothing of fedmq (``numpy.load``, no
  pickle): one array per wire tensor name (fedmq.tasks.naming), in wire order, and the
  model's metadata as 0-d arrays under reserved names beginning ``fedmq:`` (a ``:``
  never appears in a tensor name): ``fedmq:task`` (str), ``fedmq:task_version`` and
  ``fedmq:task_fingerprint`` (str, when the model carries them), ``fedmq:model_id``
  (str), ``fedmq:round`` (int). An ``.npz`` a user wrote without them loads too: its
  tensors are then checked against the task by name, shape and dtype only.

JAX is imported only by ``load_params``.
"""

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.files import output_problem, write_output
from fedmq.schemas import SchemaError, decode_global
from fedmq.schemas.messages import DEFAULT_MAX_BYTES, DEFAULT_MAX_ELEMENTS, model_id_of
from fedmq.schemas.tensors import Params
from fedmq.tasks.layout import TaskLayout, layout_difference, layout_of

if TYPE_CHECKING:
    from fedmq.tasks.task import Task

SUFFIXES = (".msgpack", ".npz")
META = "fedmq:"  # the prefix of the .npz's metadata arrays
_TEXT_META = ("task", "task_version", "task_fingerprint", "model_id")


class ModelFileError(ValueError):
    """A model file that cannot be written, read or used with a task (one line, with what
    to do)."""


@dataclass(frozen=True)
class ModelFile:
    """A model as a file holds it: named tensors in wire order and what they are."""

    tensors: Params
    task: str | None  # None: an .npz written without metadata
    task_version: str | None = None
    task_fingerprint: str | None = None
    model_id: str | None = None
    round: int | None = None


def suffix_problem(path: Path) -> str | None:
    """Why ``path`` cannot name a model file, or None (the path is the caller's to name)."""
    if path.suffix not in SUFFIXES:
        return "the name must end in .msgpack or .npz (the suffix chooses the format)"
    return None


def save_problem(path: Path) -> str | None:
    """Why a model file cannot be written at ``path`` (suffix, directory), or None:
    checked before a run starts, not when its first model is ready."""
    return suffix_problem(path) or output_problem(path)


def from_global(payload: bytes) -> ModelFile:
    """The model of a global model message; SchemaError if it is not a valid one."""
    model = _decode(payload)
    return ModelFile(
        tensors=dict(model.params),
        task=model.model,
        # optional wire fields (PROTOCOL 8.1): absent in messages of older aggregators
        task_version=getattr(model, "task_version", None),
        task_fingerprint=getattr(model, "task_fingerprint", None),
        model_id=model.model_id,
        round=model.round,
    )


def npz_bytes(model: ModelFile) -> bytes:
    """The ``.npz`` form: tensors in wire order, then the metadata that is known."""
    arrays: dict[str, np.ndarray] = dict(model.tensors)
    for key in _TEXT_META:
        value = getattr(model, key)
        if value is not None:
            arrays[META + key] = np.array(str(value))
    if model.round is not None:
        arrays[META + "round"] = np.array(model.round, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def write_model(path: Path, global_payload: bytes) -> ModelFile:
    """Write the model of a global model message to ``path`` in the format its suffix
    names, atomically (a temporary file fsynced and renamed over it: a reader sees the old
    model or the new, whole). The message is decoded first, so a damaged one is refused."""
    problem = suffix_problem(path)
    if problem is not None:
        raise ModelFileError(f"cannot write {path}: {problem}")
    model = from_global(global_payload)
    data = global_payload if path.suffix == ".msgpack" else npz_bytes(model)
    try:
        write_output(path, data)
    except ValueError as error:
        raise ModelFileError(str(error)) from None
    return model


def read_model(path: Path) -> ModelFile:
    """A model file (.msgpack or .npz), checked; ModelFileError (one line) if it is not one."""
    problem = suffix_problem(path)
    if problem is not None:
        raise ModelFileError(f"cannot read {path}: {problem}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(
            f"{path} does not exist (write one with fedmq export --state-dir DIR --out {path})"
        ) from None
    except OSError as error:
        raise ModelFileError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return from_global(data) if path.suffix == ".msgpack" else _from_npz(data)
    except (SchemaError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ModelFileError(f"{path} is not a fedmq model file: {error}") from None


def _decode(payload: bytes) -> Any:
    """decode_global with limits from the payload's own size (a file, not the network)."""
    return decode_global(
        payload,
        max_bytes=max(len(payload), DEFAULT_MAX_BYTES),
        max_elements=max(len(payload) // 2, DEFAULT_MAX_ELEMENTS),
    )


def _from_npz(data: bytes) -> ModelFile:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    tensors = {name: array for name, array in arrays.items() if not name.startswith(META)}
    meta = {name[len(META) :]: array for name, array in arrays.items() if name.startswith(META)}
    if not tensors:
        raise ValueError("it holds no tensors")
    text = {key: str(meta[key].item()) for key in _TEXT_META if key in meta}
    model = ModelFile(
        tensors=tensors,
        task=text.get("task"),
        task_version=text.get("task_version"),
        task_fingerprint=text.get("task_fingerprint"),
        model_id=text.get("model_id"),
        round=int(meta["round"]) if "round" in meta else None,
    )
    if model.model_id is not None and model_id_of(tensors) != model.model_id:
        raise ValueError(
            f"its tensors do not hash to its fedmq:model_id {model.model_id} (changed after "
            "export; drop fedmq:model_id if that was on purpose)"
        )
    return model


def mismatch(expected: TaskLayout, model: ModelFile) -> str | None:
    """Why ``model`` is not a model of the task whose layout is ``expected``, or None.

    With a task fingerprint (PROTOCOL 8.1) the fingerprints decide; without one (an older
    aggregator's model, a hand-written .npz) the task name if known, and the tensors'
    names, shapes and dtypes, taken in the task's order."""
    if model.task_fingerprint is not None:
        if model.task_fingerprint == expected.fingerprint:
            return None
        got = layout_of(model.task or expected.task, model.task_version, model.tensors)
        return layout_difference(expected, got) or (
            f"task fingerprint {model.task_fingerprint} where {expected.fingerprint} was expected"
        )
    wanted = [spec.name for spec in expected.tensors]
    ordered = {name: model.tensors[name] for name in wanted if name in model.tensors}
    ordered.update((name, t) for name, t in model.tensors.items() if name not in ordered)
    got = layout_of(model.task or expected.task, expected.version, ordered)
    return layout_difference(expected, got)


def load_params(path: str | Path, task: "Task", personal: Mapping[str, Any] | None = None) -> Any:
    """The parameters in a model file (.msgpack or .npz) as ``task``'s own pytree (numpy
    arrays as leaves), for ``task``'s apply function to predict with.

    A task with personal parameters: the file holds the shared ones only; ``personal``
    (named tensors, e.g. ``numpy.load`` of a node's ``personal.npz`` through
    ``fedmq.node.saved_tensors.load(...).tensors``) gives a node's own, else they are the
    task's initial ones (seed 0). The file must be a model of ``task``: ModelFileError,
    one line naming the first difference (task name, version, a tensor's name, shape or
    dtype), if it is not."""
    import jax

    from fedmq.tasks.naming import flatten_params, named_leaves, unflatten_params
    from fedmq.tasks.personal import join, shared_layout
    from fedmq.tasks.seeds import seed_key

    path = Path(path)
    model = read_model(path)
    template = jax.eval_shape(task.init, seed_key(0))
    expected, own_shapes = shared_layout(task, template)
    difference = mismatch(expected, model)
    if difference is not None:
        raise ModelFileError(f"{path} is not a model of task {task.name!r}: {difference}")
    own = frozenset(own_shapes)
    if not own:
        return unflatten_params(template, model.tensors)
    if personal is None:
        initial = flatten_params(task.init(seed_key(0)))
        personal = {name: initial[name] for name in own}
    if set(personal) != own:
        raise ModelFileError(
            f"task {task.name!r} has personal tensors {sorted(own)}; personal= gives "
            f"{sorted(personal)}: give exactly those (a node's personal.npz)"
        )
    order = [name for name, _, _ in named_leaves(template)]
    return unflatten_params(template, join(order, model.tensors, personal))


def describe(model: ModelFile) -> str:
    """``after 30 rounds, model 1a2b.. of task 'digits-mlp': 4 tensors, 50890 parameters``:
    a global model's ``round`` is the round that trains from it, so it is the model after
    ``round - 1`` rounds (a finished run of 30 rounds ends with the model of round 31)."""
    count = sum(int(np.prod(t.shape)) for t in model.tensors.values())
    done = None if model.round is None else model.round - 1
    where = "" if done is None else f"after {done} round{'s' * (done != 1)}, "
    return (
        f"{where}model {model.model_id} of task {model.task!r}: {len(model.tensors)} tensors, "
        f"{count} parameters"
    )
