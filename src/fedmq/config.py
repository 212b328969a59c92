"""Settings from a TOML file and the environment, under the command line.

One file format serves every role. It has a section per command plus a shared
``[connection]`` section::

    [connection]                    # node, aggregator, monitor: where the broker is
    broker = "hub.local:8883"
    federation = "lab"
    username = "pi-01"
    password_file = "password"      # relative: next to this file
    tls_ca = "ca.crt"

    [node]
    node_id = "pi-01"
    data = "/var/lib/fedmq-node/data.npz"
    state_dir = "/var/lib/fedmq-node"

Keys are the command's long option names with ``_`` for ``-`` (``--batch-size`` is
``batch_size``) and go through the option's own check, so a bad value gets the message
the option would give. Precedence, highest first: command-line option, environment
variable ``FEDMQ_<SECTION>_<KEY>`` (``FEDMQ_NODE_STATE_DIR``,
``FEDMQ_CONNECTION_BROKER``), config file (``--config PATH`` or ``FEDMQ_CONFIG``),
built-in default. Relative paths in a file resolve against the file's directory, so a
credentials bundle can be moved as one folder; on the command line and in the
environment they resolve against the working directory, as usual.

Everything wrong is reported at start-up as one line naming the key::

    config /etc/fedmq/node.toml: node.batch_size: '0' is not a whole number >= 1

This module reads no environment itself: the entry point passes ``os.environ`` in.
"""

import argparse
import datetime
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_ENV = "FEDMQ_CONFIG"

# Options shared by every client of a broker: they live in [connection], not in a role's
# section, so one file (or one bundle from `fedmq broker init`) serves them all.
CONNECTION = "connection"
CONNECTION_KEYS = (
    "broker",
    "federation",
    "username",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
)

# Commands that take --config; each reads [connection] (if it has those options) and the
# section named after it. `fedmq demo` runs a whole federation on its own and reads none.
COMMANDS = ("node", "aggregator", "broker", "monitor")
SECTIONS = (CONNECTION, *COMMANDS)

# Keys that take a TOML array as well as the option's comma-separated text.
LIST_KEYS = frozenset({"node_ids"})
# Keys holding a path or a keyword: a path in a file resolves against the file's folder.
PATH_OR_KEYWORD = {"test_data": frozenset({"digits", "none"})}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line that names it."""


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--config PATH`` on one subcommand's parser (after its other options)."""
    name = parser.prog.split()[-1]
    connects = any(action.dest in CONNECTION_KEYS for action in parser._actions)
    sections = f"sections [{CONNECTION}] and [{name}]" if connects else f"section [{name}]"
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"TOML settings file, {sections} (default: ${CONFIG_ENV}); options "
        "and FEDMQ_<SECTION>_<KEY> variables override it. Relative paths in it are "
        "relative to its directory. Examples: deploy/config/",
    )


def env_name(section: str, key: str) -> str:
    return f"FEDMQ_{section}_{key}".upper()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A subcommand's settable options by key (its dest), --config and --help left out."""
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings
        and action.dest not in ("help", "config")
        and not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
    }


def section_keys(
    parser: argparse.ArgumentParser, command: str
) -> dict[str, dict[str, argparse.Action]]:
    """The keys a file may hold for ``command``: {section: {key: action}}."""
    found = options(_subcommands(parser)[command])
    return {
        CONNECTION: {k: a for k, a in found.items() if k in CONNECTION_KEYS},
        command: {k: a for k, a in found.items() if k not in CONNECTION_KEYS},
    }


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)


def _convert(action: argparse.Action, text: str) -> Any:
    """The option's own check on ``text``; its message on failure."""
    if _is_flag(action):
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ValueError(f"{text!r} is not true or false")
    convert = action.type if callable(action.type) else str
    try:
        value = convert(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        message = str(error) or f"invalid value {text!r}"
        if convert in (int, float):
            message = f"{text!r} is not a{'n integer' if convert is int else ' number'}"
        raise ValueError(message) from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _is_path(action: argparse.Action) -> bool:
    return action.type is Path


def _from_toml(key: str, action: argparse.Action, value: Any, base: Path) -> Any:
    """A file's value for ``key``, checked like the option, paths resolved under ``base``."""
    if isinstance(value, dict):
        raise ValueError("is a table, expected a value")
    if _is_flag(action):
        if not isinstance(value, bool):
            raise ValueError(f"{_show(value)} is not true or false")
        return value
    if isinstance(value, list) and key in LIST_KEYS:
        if not all(isinstance(item, str) for item in value):
            raise ValueError(f"{_show(value)} is not a list of strings")
        value = ",".join(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{_show(value)} is not {_kind(action)}")
    if isinstance(value, int | float) and _wants_text(action):
        raise ValueError(f"{_show(value)} is not a string (quote it)")
    text = str(value)
    if _is_path(action) or (key in PATH_OR_KEYWORD and text not in PATH_OR_KEYWORD[key]):
        text = str(base / Path(text).expanduser())
    return _convert(action, text)


def _wants_text(action: argparse.Action) -> bool:
    return action.type is None or _is_path(action)


def _kind(action: argparse.Action) -> str:
    """What the option takes, for messages (its check gives the details)."""
    if _wants_text(action) or isinstance(action.default, str):
        return "a string"
    if isinstance(action.default, int | float):
        return "a number"
    return "a number or a string"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()  # as written in the file
    return repr(value)


def load(path: Path) -> dict[str, Any]:
    """A config file's tables; ConfigError if it cannot be read or is not TOML."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {path}: not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config {path}: not valid TOML: not UTF-8 ({error.reason})") from None
    except OSError as error:
        raise ConfigError(f"config {path}: cannot read: {error.strerror or error}") from None


def read_file(parser: argparse.ArgumentParser, path: Path) -> dict[str, dict[str, Any]]:
    """Every section of the file at ``path`` checked against the options of its command,
    relative paths resolved against the file's folder: {section: {key: value}}."""
    document = load(path)
    base = path.resolve().parent
    settings: dict[str, dict[str, Any]] = {}
    for section, table in document.items():
        where = f"config {path}"
        if section not in SECTIONS:
            if isinstance(table, dict):
                known = ", ".join(f"[{s}]" for s in SECTIONS)
                raise ConfigError(f"{where}: unknown section [{section}] (known: {known})")
            raise ConfigError(f"{where}: unknown key {section} (keys belong in a section)")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {section} is a value, expected a section [{section}]")
        # [connection] is checked with the node's options (every client has them)
        allowed = section_keys(parser, "node" if section == CONNECTION else section)[section]
        settings[section] = {}
        for key, value in table.items():
            action = allowed.get(key)
            if action is None:
                raise ConfigError(f"{where}: {_unknown(section, key)}")
            try:
                settings[section][key] = _from_toml(key, action, value, base)
            except ValueError as error:
                raise ConfigError(f"{where}: {section}.{key}: {error}") from None
    return settings


def _unknown(section: str, key: str) -> str:
    if section != CONNECTION and key in CONNECTION_KEYS:
        return f"unknown key {section}.{key} (it belongs in [{CONNECTION}])"
    return f"unknown key {section}.{key}"


def read_environment(
    parser: argparse.ArgumentParser, command: str, environ: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """``FEDMQ_<SECTION>_<KEY>`` variables of the sections ``command`` reads, checked."""
    settings: dict[str, dict[str, Any]] = {}
    for section, allowed in section_keys(parser, command).items():
        prefix = env_name(section, "")
        if not allowed:
            continue
        settings[section] = {}
        by_name = {env_name(section, key): key for key in allowed}
        for name, text in environ.items():
            if not name.startswith(prefix):
                continue
            key = by_name.get(name)
            if key is None:
                key = name[len(prefix) :].lower()
                raise ConfigError(f"environment {name}: {_unknown(section, key)}")
            try:
                settings[section][key] = _convert(allowed[key], text)
            except ValueError as error:
                raise ConfigError(f"environment {name}: {section}.{key}: {error}") from None
    return settings


def parse_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    environ: Mapping[str, str],
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with settings the command line leaves out taken from
    the environment, then the config file, then the options' defaults.

    Usage errors on the command line exit as argparse does; a bad setting anywhere else
    raises ConfigError with one line naming it (the caller prints it and exits 2)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = _subcommands(parser)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS or command not in commands:
        return parser.parse_args(argv)
    sub = commands[command]
    found = options(sub)
    # Parse with every default replaced by a marker, so an option given on the command
    # line is told apart from one left out, even when given its default value; required
    # options may come from the environment or a file, so argparse must not insist.
    defaults = {key: action.default for key, action in found.items()}
    required = {key for key, action in found.items() if action.required}
    groups = [(g, g.required) for g in sub._mutually_exclusive_groups]
    try:
        for action in found.values():
            action.default, action.required = _UNSET, False
        for group, _ in groups:
            group.required = False
        args = parser.parse_args(argv)
    finally:
        for key, action in found.items():
            action.default, action.required = defaults[key], key in required
        for group, was in groups:
            group.required = was

    path = args.config if args.config is not None else environ.get(CONFIG_ENV) or None
    args.config = Path(path) if path is not None else None
    layers: list[tuple[str, dict[str, Any]]] = [
        ("command line", {k: v for k, v in vars(args).items() if k in found and v is not _UNSET}),
        ("environment", _flatten(read_environment(parser, command, environ), command)),
    ]
    if args.config is not None:
        layers.append((f"config {args.config}", _flatten(read_file(parser, args.config), command)))
    chosen = _choose(layers, sub, command)
    for key in found:
        setattr(args, key, chosen[key] if key in chosen else defaults[key])
    _check_required(args, sub, command, required, groups)
    return args


def _flatten(settings: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    """The keys ``command`` reads: [connection] and its own section."""
    return {**settings.get(CONNECTION, {}), **settings.get(command, {})}


def _where(key: str, source: str, command: str) -> str:
    section = CONNECTION if key in CONNECTION_KEYS else command
    if source == "environment":
        return env_name(section, key)
    return f"{section}.{key}"


def _choose(
    layers: list[tuple[str, dict[str, Any]]], sub: argparse.ArgumentParser, command: str
) -> dict[str, Any]:
    """Each key from the highest layer that sets it; of mutually exclusive options, only
    those of the highest layer that sets any of them."""
    chosen: dict[str, Any] = {}
    for _, values in reversed(layers):
        chosen.update(values)
    for group in sub._mutually_exclusive_groups:
        members = [action.dest for action in group._group_actions]
        for source, values in layers:
            given = [key for key in members if key in values]
            if len(given) > 1:
                both = " and ".join(_where(key, source, command) for key in given)
                raise ConfigError(f"{source}: {both} cannot both be set")
            if given:
                for key in members:
                    if key not in given:
                        chosen.pop(key, None)
                break
    return chosen


def _check_required(
    args: argparse.Namespace,
    sub: argparse.ArgumentParser,
    command: str,
    required: set[str],
    groups: list[tuple[Any, bool]],
) -> None:
    found = options(sub)
    for key in sorted(required):
        if getattr(args, key) is None:
            raise ConfigError(f"{_where(key, '', command)} is not set: {_how(found[key], command)}")
    for group, was_required in groups:
        members = group._group_actions
        if was_required and all(getattr(args, action.dest) is None for action in members):
            section = command
            keys = ", ".join(f"{section}.{action.dest}" for action in members)
            flags = " or ".join(action.option_strings[-1] for action in members)
            names = " or ".join(env_name(section, action.dest) for action in members)
            raise ConfigError(
                f"one of {keys} must be set: give {flags}, {names}, "
                f"or one of them in [{section}] of the --config file"
            )


def _how(action: argparse.Action, command: str) -> str:
    key = action.dest
    section = CONNECTION if key in CONNECTION_KEYS else command
    return (
        f"give {action.option_strings[-1]}, {env_name(section, key)} "
        f"or {key} in [{section}] of the --config file"
    )
