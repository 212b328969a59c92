"""Finding a task by what a user types after ``--task``.

In this order:

1. a built-in name: ``digits-mlp``, ``digits-mlp-large``, ``mlp:IN-HIDDEN-...-CLASSES``, or
   one of the built-in examples (``EXAMPLES``: ``digits-cnn``, ``activity-cnn``,
   ``diabetes-mlp``);
2. ``MODULE:ATTRIBUTE``: a module importable on this machine (an installed package, or a
   ``MODULE.py`` / package folder in the working directory) and in it a ``fedmq.Task``, or
   a function of no arguments returning one (``ATTRIBUTE`` may be dotted: ``tasks.cnn``);
3. a name registered by an installed package under the entry-point group ``fedmq.tasks``
   (``[project.entry-points."fedmq.tasks"] my-task = "my_package.tasks:task"``).

Every failure is a ``TaskError`` (a ValueError): one line with the cause and the fix.
Importing this module imports neither JAX nor the task's module; resolving does.
"""

import importlib
import re
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from fedmq.models import MODELS, SPEC_PREFIX, get_model
from fedmq.tasks.task import Task

ENTRY_POINT_GROUP = "fedmq.tasks"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATTRIBUTE = _MODULE  # dotted identifiers too
# The built-in example tasks: name -> (module in fedmq.tasks, function making the Task).
EXAMPLES = {
    "digits-cnn": ("digits_cnn", "digits_cnn_task"),
    "activity-cnn": ("activity_cnn", "activity_cnn_task"),
    "diabetes-mlp": ("diabetes", "diabetes_task"),
}


class TaskError(ValueError):
    """A task that cannot be found or is not a Task; the message says why and what to do."""


def builtin_names() -> list[str]:
    return [*MODELS, *EXAMPLES, f"{SPEC_PREFIX}IN-...-CLASSES"]


def registered_names() -> list[str]:
    """Names under the ``fedmq.tasks`` entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def is_builtin(spec: str) -> bool:
    """Whether ``spec`` names a built-in task (a built-in model name or an ``mlp:`` spec,
    well formed or not): those need no import, and the aggregator runs them without JAX."""
    return spec in MODELS or (spec.startswith(SPEC_PREFIX) and not _import_path(spec))


def check_spec(spec: str) -> str:
    """``spec`` if it can name a task, without importing anything (for option parsing):
    a built-in one is checked whole, ``MODULE:ATTRIBUTE`` for its form; TaskError else."""
    if is_builtin(spec):
        try:
            get_model(spec)
        except ValueError as error:
            raise TaskError(str(error)) from None
    elif ":" in spec:
        module, _, attribute = spec.partition(":")
        _check_import_path(spec, module, attribute)
    elif not spec:
        raise TaskError("give a task: a built-in name, MODULE:ATTRIBUTE or a registered name")
    return spec


def load_task(spec: str) -> Task:
    """The task ``spec`` names (see the module's docstring); TaskError otherwise."""
    if is_builtin(spec):
        from fedmq.tasks.builtin import mlp_task

        try:
            return mlp_task(spec)
        except ValueError as error:
            raise TaskError(str(error)) from None
    if spec in EXAMPLES:
        module, function = EXAMPLES[spec]
        made: Task = getattr(importlib.import_module(f"fedmq.tasks.{module}"), function)()
        return made
    if ":" in spec:
        module, _, attribute = spec.partition(":")
        return _from_import_path(spec, module, attribute)
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if matches:
        return _from_entry_point(spec, matches[0])
    known = ", ".join(builtin_names() + registered_names())
    raise TaskError(
        f"unknown task {spec!r}; known: {known}; or your own as MODULE:ATTRIBUTE "
        "(e.g. my_tasks:task, with my_tasks.py in the working directory)"
    )


def _import_path(spec: str) -> bool:
    module, colon, attribute = spec.partition(":")
    return bool(colon) and bool(_MODULE.fullmatch(module)) and bool(_ATTRIBUTE.fullmatch(attribute))


def _check_import_path(spec: str, module_name: str, attribute: str) -> None:
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        stem = Path(module_name).stem
        raise TaskError(
            f"task {spec!r}: give a module name, not a file: run from the folder holding "
            f"{Path(module_name).name} and use {stem}:{attribute or 'ATTRIBUTE'}"
        )
    if not _MODULE.fullmatch(module_name) or not _ATTRIBUTE.fullmatch(attribute):
        raise TaskError(
            f"task {spec!r} is not MODULE:ATTRIBUTE (Python names, e.g. my_tasks:task) "
            f"nor a known task ({', '.join(builtin_names())})"
        )


def _from_import_path(spec: str, module_name: str, attribute: str) -> Task:
    _check_import_path(spec, module_name, attribute)
    module = _import(spec, module_name)
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            where = getattr(module, "__file__", None) or module_name
            tasks = sorted(n for n, v in vars(module).items() if isinstance(v, Task))
            has = f"; it has the tasks {', '.join(tasks)}" if tasks else ""
            raise TaskError(
                f"task {spec!r}: module {module_name!r} ({where}) has no attribute "
                f"{attribute!r}{has}"
            )
        value = getattr(value, part)
    return _as_task(spec, f"{module_name}:{attribute}", value)


def _import(spec: str, module_name: str) -> Any:
    top = module_name.split(".")[0]
    try:
        return _import_module(spec, module_name)
    except ModuleNotFoundError as error:
        if error.name not in {top, module_name} and not module_name.startswith(f"{error.name}."):
            raise TaskError(
                f"task {spec!r}: module {module_name!r} needs {error.name!r}, which is not "
                f"installed: install it (pip install ...) on this machine"
            ) from None
    # Not installed: a file (or package folder) in the working directory, where the
    # `fedmq` command (unlike `python -m fedmq`) does not look.
    cwd = Path.cwd()
    if str(cwd) in sys.path or not (
        (cwd / f"{top}.py").is_file() or (cwd / top / "__init__.py").is_file()
    ):
        raise TaskError(
            f"task {spec!r}: no module {module_name!r}: neither installed nor {top}.py in "
            f"{cwd}; install it, or run from the folder that holds it"
        )
    sys.path.append(str(cwd))  # last: installed packages keep their names
    try:
        return _import_module(spec, module_name)
    except ModuleNotFoundError as error:
        raise TaskError(
            f"task {spec!r}: module {module_name!r} in {cwd} needs {error.name!r}, which is "
            "not installed: install it (pip install ...) on this machine"
        ) from None


def _import_module(spec: str, module_name: str) -> Any:
    """importlib.import_module; ModuleNotFoundError passes, any other failure of the user's
    module becomes a TaskError."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise
    except Exception as error:
        raise TaskError(
            f"task {spec!r}: importing module {module_name!r} failed: "
            f"{type(error).__name__}: {_first_line(error)}; fix the module"
        ) from None


def _from_entry_point(spec: str, entry_point: EntryPoint) -> Task:
    try:
        value = entry_point.load()
    except Exception as error:
        raise TaskError(
            f"task {spec!r}: its entry point {entry_point.value!r} (group "
            f"{ENTRY_POINT_GROUP!r}) failed to load: {type(error).__name__}: "
            f"{_first_line(error)}; fix or reinstall the package that registers it"
        ) from None
    return _as_task(spec, entry_point.value, value)


def _as_task(spec: str, where: str, value: Any) -> Task:
    if isinstance(value, Task):
        return value
    if callable(value) and not isinstance(value, type):
        made = _call(spec, where, value)
        if isinstance(made, Task):
            return made
        raise TaskError(
            f"task {spec!r}: {where}() returned a {type(made).__name__}, not a fedmq.Task; "
            "return Task(name=..., init=..., loss=..., optimizer=...)"
        )
    raise TaskError(
        f"task {spec!r}: {where} is a {type(value).__name__}, not a fedmq.Task nor a function "
        "returning one; point at task = Task(name=..., init=..., loss=..., optimizer=...)"
    )


def _call(spec: str, where: str, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except Exception as error:
        raise TaskError(
            f"task {spec!r}: calling {where}() failed: {type(error).__name__}: "
            f"{_first_line(error)}; it must take no arguments and return a fedmq.Task"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
