"""Parameters of any pytree as named tensors, and back onto the task's own tree.

On the wire a model is an ordered map from tensor name to array (docs/PROTOCOL.md,
section 6). A task's parameters are any pytree: nested dicts (Flax), tuples and lists,
dataclass modules registered as pytrees (Equinox), NamedTuples. Each leaf is named by its
key path (``jax.tree_util``), its parts joined by ``.``:

- a dict key (str) as it is, an int dict key in decimal: ``{"dense0": {"w": ..}}`` ->
  ``dense0.w``;
- a sequence index in decimal: ``{"layers": [{"kernel": ..}]}`` -> ``layers.0.kernel``;
- an attribute (dataclass field, NamedTuple field) by its name: ``Model(w=..)`` -> ``w``;
- a tree that is one array: ``params``.

Dict keys may use ``A-Z a-z 0-9 _ - /`` (``.`` joins the parts, so it may not appear in a
key); a whole name has at most 64 characters. These keep every name a valid wire tensor
name (``[A-Za-z0-9_./-]{1,64}``) and distinct names for distinct leaves. The order is
``jax.tree_util``'s flattening order (dict keys sorted), which every node reproduces from
the same tree. Leaves must be float32 or float16 arrays, the dtypes that travel.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fedmq.schemas.tensors import WIRE_DTYPES, Params
from fedmq.tasks.task import KeyPath

MAX_NAME = 64
SINGLE_LEAF = "params"  # the name of a tree that is one array
_KEY = re.compile(r"[A-Za-z0-9_/-]+")
TENSOR_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")  # as schemas.messages checks it


class NamingError(ValueError):
    """A pytree whose leaves cannot be named as wire tensors, or named tensors that do not
    fit a tree; the message names the leaf or tensor."""


def key_path_parts(path: tuple[Any, ...]) -> KeyPath:
    """``jax.tree_util`` key entries -> plain parts: str for keys and attributes, int for
    indices (what ``Task.personal`` receives)."""
    parts: list[str | int] = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            key = entry.key
            if isinstance(key, str | int) and not isinstance(key, bool):
                parts.append(key)
                continue
            raise NamingError(
                f"params at {_where(parts)} has a dict key {key!r} of type "
                f"{type(key).__name__}: use str keys (or ints)"
            )
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(entry.idx)
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(entry.key)
        else:
            raise NamingError(
                f"params at {_where(parts)}: a pytree node with key {entry!r} cannot name a "
                "tensor; register it with dict, attribute or index keys"
            )
    return tuple(parts)


def tensor_name(parts: KeyPath) -> str:
    """The wire name of the leaf at ``parts``; NamingError saying what to rename."""
    if not parts:
        return SINGLE_LEAF
    for part in parts:
        if isinstance(part, str) and not _KEY.fullmatch(part):
            raise NamingError(
                f"params at {_where(parts)}: key {part!r} cannot name a tensor; keys may use "
                "A-Z a-z 0-9 _ - / ('.' joins the parts of a name)"
            )
    name = ".".join(str(part) for part in parts)
    if len(name) > MAX_NAME:
        raise NamingError(
            f"params at {_where(parts)}: its name {name!r} is longer than {MAX_NAME} "
            "characters; use shorter keys"
        )
    return name


def named_leaves(params: Any) -> list[tuple[str, KeyPath, Any]]:
    """(name, key path parts, leaf) for every leaf, in flattening order; names distinct."""
    leaves, _ = _flatten(params)
    named: list[tuple[str, KeyPath, Any]] = []
    seen: set[str] = set()
    for path, leaf in leaves:
        parts = key_path_parts(path)
        name = tensor_name(parts)
        if name in seen:
            raise NamingError(f"params: two leaves are named {name!r}; rename one of their keys")
        seen.add(name)
        named.append((name, parts, leaf))
    if not named:
        raise NamingError("params has no arrays: init must return at least one float array")
    return named


def flatten_params(params: Any) -> Params:
    """Any pytree of float arrays -> ``{tensor name: numpy array}`` in flattening order.

    The arrays are numpy (copied off the device if they were JAX arrays), dtypes unchanged.
    """
    flat: Params = {}
    for name, _, leaf in named_leaves(params):
        flat[name] = _float_array(name, leaf)
    return flat


def tensor_specs(params: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every leaf without copying data: works on arrays and on
    ``jax.ShapeDtypeStruct`` (``jax.eval_shape(task.init, key)``)."""
    specs = []
    for name, _, leaf in named_leaves(params):
        shape, dtype = _shape_and_dtype(name, leaf)
        specs.append((name, shape, dtype))
    return specs


def unflatten_params(template: Any, named: Mapping[str, Any]) -> Any:
    """Named tensors -> a pytree shaped like ``template`` (the task's own tree, with arrays or
    ``jax.ShapeDtypeStruct`` leaves), holding numpy arrays.

    Every tensor of the template must be in ``named`` with its shape and dtype, and
    ``named`` must hold nothing else; NamingError names the first tensor that does not fit.
    """
    leaves, treedef = _flatten(template)
    values = []
    expected: set[str] = set()
    for path, leaf in leaves:
        name = tensor_name(key_path_parts(path))
        expected.add(name)
        shape, dtype = _shape_and_dtype(name, leaf)
        if name not in named:
            raise NamingError(f"tensor {name!r} is missing (the task's params have it)")
        array = np.asarray(named[name])
        if array.shape != shape:
            raise NamingError(
                f"tensor {name!r} has shape {array.shape}; the task's params have {shape}"
            )
        if array.dtype != dtype:
            raise NamingError(f"tensor {name!r} is {array.dtype}; the task's params are {dtype}")
        values.append(array)
    extra = [name for name in named if name not in expected]
    if extra:
        raise NamingError(f"tensor {extra[0]!r} is not in the task's params")
    return jax.tree_util.tree_unflatten(treedef, values)


def _flatten(tree: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``jax.tree_util.tree_flatten_with_path``, with its refusal of a dict whose keys do
    not sort (str and int mixed: ``0`` and ``"0"`` would both be named ``0``) in our words."""
    try:
        return jax.tree_util.tree_flatten_with_path(tree)
    except ValueError as error:
        if "sorting pytree dictionary keys" not in str(error):
            raise
        raise NamingError(
            "params has a dict whose keys mix str and int, which cannot be sorted into one "
            "order (and 0 and '0' would name one tensor): use keys of one type per dict"
        ) from None


def _float_array(name: str, leaf: Any) -> np.ndarray:
    if not hasattr(leaf, "dtype"):
        raise NamingError(
            f"params leaf {name!r} is {_a(type(leaf).__name__)}, not an array; params hold "
            "only float arrays (filter an Equinox module with eqx.filter(m, eqx.is_array))"
        )
    array = np.asarray(leaf)
    _check_dtype(name, array.dtype)
    return array


def _shape_and_dtype(name: str, leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise NamingError(
            f"params leaf {name!r} is {_a(type(leaf).__name__)}, not an array; params hold "
            "only float arrays (filter an Equinox module with eqx.filter(m, eqx.is_array))"
        )
    dtype = np.dtype(leaf.dtype)
    _check_dtype(name, dtype)
    return tuple(int(d) for d in leaf.shape), dtype


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.newbyteorder("<").str not in WIRE_DTYPES:
        raise NamingError(
            f"params leaf {name!r} is {dtype}; params must be float32 (or float16) arrays: "
            "cast it, e.g. .astype(jnp.float32)"
        )


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _where(parts: Sequence[str | int]) -> str:
    return "".join(f"[{part!r}]" for part in parts) or "the top"
