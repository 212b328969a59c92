"""A task's parameter layout and its fingerprint: what a node checks before it trains.

No code travels: the global model names its task and carries the fingerprint of the
layout, which is the task's name and declared version and, in order, every tensor's
name, shape and dtype. A node computes the fingerprint of its own task; if they differ it
refuses the model with the one line ``layout_difference`` gives.

The fingerprint (lowercase hex, 32 characters, like ``model_id``) is the first 128 bits
of SHA-256 over the UTF-8 bytes of one JSON text, keys sorted, no spaces:
``{"task":NAME,"tensors":[[NAME,DTYPE,[SIZES..]],..],"version":VERSION}`` where DTYPE is
the wire dtype (``"<f4"``, ``"<f2"``) and VERSION a str or null. Pure Python: no JAX.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the wire dtype string: "<f4" or "<f2"

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {np.dtype(self.dtype).name}"


@dataclass(frozen=True)
class TaskLayout:
    task: str
    version: str | None
    tensors: tuple[TensorSpec, ...]

    @property
    def fingerprint(self) -> str:
        text = json.dumps(
            {
                "task": self.task,
                "version": self.version,
                "tensors": [[t.name, t.dtype, list(t.shape)] for t in self.tensors],
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def layout_of(task: str, version: str | None, tensors: Mapping[str, Any]) -> TaskLayout:
    """The layout of named tensors (arrays, or anything with ``shape`` and ``dtype``)."""
    return TaskLayout(
        task,
        version,
        tuple(
            TensorSpec(
                name, tuple(int(d) for d in t.shape), np.dtype(t.dtype).newbyteorder("<").str
            )
            for name, t in tensors.items()
        ),
    )


def layout_difference(expected: TaskLayout, got: TaskLayout) -> str | None:
    """The first difference between two layouts in one line, or None when they are equal.

    Task name first, then version, then tensor by tensor in order (name, shape, dtype),
    then a missing or extra tensor at the end.
    """
    if expected.task != got.task:
        return f"task {got.task!r} where {expected.task!r} was expected"
    if expected.version != got.version:
        return (
            f"task {got.task!r} version {_version(got.version)} where "
            f"{_version(expected.version)} was expected"
        )
    for index, (want, have) in enumerate(zip(expected.tensors, got.tensors, strict=False)):
        if want.name != have.name:
            return (
                f"tensor {index + 1} is {have.name!r} where {want.name!r} was expected"
                f" ({len(got.tensors)} tensors, {len(expected.tensors)} expected)"
            )
        if want.shape != have.shape:
            return (
                f"tensor {want.name!r} has shape {list(have.shape)} where "
                f"{list(want.shape)} was expected"
            )
        if want.dtype != have.dtype:
            return (
                f"tensor {want.name!r} is {np.dtype(have.dtype).name} where "
                f"{np.dtype(want.dtype).name} was expected"
            )
    if len(got.tensors) < len(expected.tensors):
        missing = expected.tensors[len(got.tensors)]
        return (
            f"tensor {missing.name!r} is missing ({len(got.tensors)} tensors, "
            f"{len(expected.tensors)} expected)"
        )
    if len(got.tensors) > len(expected.tensors):
        extra = got.tensors[len(expected.tensors)]
        return (
            f"tensor {extra.name!r} is not expected ({len(got.tensors)} tensors, "
            f"{len(expected.tensors)} expected)"
        )
    return None


def _version(version: str | None) -> str:
    return "(none)" if version is None else repr(version)
