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

Keys are the command's declared settings (``fedmq.settings``), named like its long
options with ``_`` for ``-`` (``--batch-size`` is ``batch_size``), and go through the
setting's own check, so a bad value gets the message
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

from fedmq.settings import Command, Declared, Parser, env_name

CONFIG_ENV = "FEDMQ_CONFIG"

# The section of the settings shared by every client of a broker (broker, federation,
# credentials: fedmq.mqtt.ConnectionSettings), so one file (or one bundle from `fedmq
# broker init`) serves them all.
CONNECTION = "connection"

# Commands that take --config; each reads [connection] (if it has those settings) and the
# section named after it. `fedmq demo` runs a whole federation on its own and reads none.
COMMANDS = ("node", "aggregator", "broker", "monitor")
SECTIONS = (CONNECTION, *COMMANDS)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line that names it."""


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def add_option(command: Command) -> None:
    """``--config PATH`` on one subcommand's parser (after its other options)."""
    name = command.parser.prog.split()[-1]
    connects = any(item.section == CONNECTION for item in command.settings.values())
    sections = f"sections [{CONNECTION}] and [{name}]" if connects else f"section [{name}]"
    command.parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"TOML settings file, {sections} (default: ${CONFIG_ENV}); options "
        "and FEDMQ_<SECTION>_<KEY> variables override it. Relative paths in it are "
        "relative to its directory. Examples: deploy/config/",
    )


def section_keys(parser: Parser, command: str) -> dict[str, dict[str, Declared]]:
    """The keys a file may hold for ``command``: {section: {key: declared setting}}."""
    found = parser.commands[command].settings
    return {
        CONNECTION: {k: d for k, d in found.items() if d.section == CONNECTION},
        command: {k: d for k, d in found.items() if d.section != CONNECTION},
    }


def _connection_keys(parser: Parser) -> set[str]:
    return set(section_keys(parser, "node")[CONNECTION])


def _convert(item: Declared, text: str) -> Any:
    """The setting's own check on ``text``; its message on failure."""
    if item.setting.switch:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ValueError(f"{text!r} is not true or false")
    convert = item.setting.parse or str
    try:
        value = convert(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        message = str(error) or f"invalid value {text!r}"
        if convert in (int, float):
            message = f"{text!r} is not a{'n integer' if convert is int else ' number'}"
        raise ValueError(message) from None
    choices = item.setting.choices
    if choices is not None and value not in choices:
        raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
    return value


def _from_toml(item: Declared, value: Any, base: Path) -> Any:
    """A file's value for a setting, checked like the option, paths resolved under ``base``."""
    if isinstance(value, dict):
        raise ValueError("is a table, expected a value")
    if item.setting.switch:
        if not isinstance(value, bool):
            raise ValueError(f"{_show(value)} is not true or false")
        return value
    if isinstance(value, list) and item.setting.listable:
        if not all(isinstance(item, str) for item in value):
            raise ValueError(f"{_show(value)} is not a list of strings")
        value = ",".join(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{_show(value)} is not {_kind(item)}")
    if isinstance(value, int | float) and _wants_text(item):
        raise ValueError(f"{_show(value)} is not a string (quote it)")
    text = str(value)
    keywords = item.setting.keywords
    if item.is_path or (keywords and text not in keywords):
        text = str(base / Path(text).expanduser())
    return _convert(item, text)


def _wants_text(item: Declared) -> bool:
    return item.setting.parse is None or item.is_path


def _kind(item: Declared) -> str:
    """What the setting takes, for messages (its check gives the details)."""
    if _wants_text(item) or isinstance(item.default, str):
        return "a string"
    if isinstance(item.default, int | float):
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


def read_file(parser: Parser, path: Path) -> dict[str, dict[str, Any]]:
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
            item = allowed.get(key)
            if item is None:
                raise ConfigError(f"{where}: {_unknown(parser, section, key)}")
            try:
                settings[section][key] = _from_toml(item, value, base)
            except ValueError as error:
                raise ConfigError(f"{where}: {section}.{key}: {error}") from None
    return settings


def _unknown(parser: Parser, section: str, key: str) -> str:
    if section != CONNECTION and key in _connection_keys(parser):
        return f"unknown key {section}.{key} (it belongs in [{CONNECTION}])"
    return f"unknown key {section}.{key}"


def read_environment(
    parser: Parser, command: str, environ: Mapping[str, str]
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
                raise ConfigError(f"environment {name}: {_unknown(parser, section, key)}")
            try:
                settings[section][key] = _convert(allowed[key], text)
            except ValueError as error:
                raise ConfigError(f"environment {name}: {section}.{key}: {error}") from None
    return settings


def parse_args(
    parser: Parser, argv: list[str] | None, environ: Mapping[str, str]
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with settings the command line leaves out taken from
    the environment, then the config file, then the declared defaults.

    Usage errors on the command line exit as argparse does; a bad setting anywhere else
    raises ConfigError with one line naming it (the caller prints it and exits 2)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS or command not in parser.commands:
        return parser.parse_args(argv)
    declared = parser.commands[command]
    found = declared.settings
    # Parse with every default replaced by a marker, so an option given on the command
    # line is told apart from one left out, even when given its default value; required
    # options may come from the environment or a file, so argparse must not insist.
    with declared.lenient(_UNSET):
        args = parser.parse_args(argv)

    path = args.config if args.config is not None else environ.get(CONFIG_ENV) or None
    args.config = Path(path) if path is not None else None
    layers: list[tuple[str, dict[str, Any]]] = [
        ("command line", {k: v for k, v in vars(args).items() if k in found and v is not _UNSET}),
        ("environment", _flatten(read_environment(parser, command, environ), command)),
    ]
    if args.config is not None:
        layers.append((f"config {args.config}", _flatten(read_file(parser, args.config), command)))
    chosen = _choose(layers, found, command)
    for key, item in found.items():
        setattr(args, key, chosen.get(key, item.default))
    _check_required(args, found, command)
    return args


def _flatten(settings: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    """The keys ``command`` reads: [connection] and its own section."""
    return {**settings.get(CONNECTION, {}), **settings.get(command, {})}


def _where(item: Declared, source: str) -> str:
    return item.env if source == "environment" else f"{item.section}.{item.name}"


def _groups(found: dict[str, Declared]) -> dict[Any, list[Declared]]:
    """The settings of each mutually exclusive group, in declaration order."""
    groups: dict[Any, list[Declared]] = {}
    for item in found.values():
        if item.setting.exclusive is not None:
            groups.setdefault(item.setting.exclusive, []).append(item)
    return groups


def _choose(
    layers: list[tuple[str, dict[str, Any]]], found: dict[str, Declared], command: str
) -> dict[str, Any]:
    """Each key from the highest layer that sets it; of mutually exclusive settings, only
    those of the highest layer that sets any of them."""
    chosen: dict[str, Any] = {}
    for _, values in reversed(layers):
        chosen.update(values)
    for members in _groups(found).values():
        for source, values in layers:
            given = [item for item in members if item.name in values]
            if len(given) > 1:
                both = " and ".join(_where(item, source) for item in given)
                raise ConfigError(f"{source}: {both} cannot both be set")
            if given:
                for item in members:
                    if item not in given:
                        chosen.pop(item.name, None)
                break
    return chosen


def _check_required(args: argparse.Namespace, found: dict[str, Declared], command: str) -> None:
    for key in sorted(k for k, item in found.items() if item.setting.required):
        if getattr(args, key) is None:
            raise ConfigError(f"{_where(found[key], '')} is not set: {_how(found[key])}")
    for group, members in _groups(found).items():
        if group.required and all(getattr(args, item.name) is None for item in members):
            keys = ", ".join(f"{item.section}.{item.name}" for item in members)
            flags = " or ".join(item.flag for item in members)
            names = " or ".join(item.env for item in members)
            raise ConfigError(
                f"one of {keys} must be set: give {flags}, {names}, "
                f"or one of them in [{command}] of the --config file"
            )


def _how(item: Declared) -> str:
    return f"give {item.flag}, {item.env} or {item.name} in [{item.section}] of the --config file"
