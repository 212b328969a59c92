"""Settings declared once, as frozen dataclasses; everything else is derived from them.

Each command's settings are one frozen dataclass (``aggregator.settings.AggregatorSettings``,
``node.settings.NodeSettings``, ...) whose fields carry a ``Setting`` in their metadata
(``setting(default, help=..., parse=...)``). From that one declaration come:

- the command-line option: ``--batch-size`` for the field ``batch_size`` (or ``flag``),
  its check (``parse``: text in, value out, a one-line message on error), default, help,
  metavar, choices, required, mutually exclusive group (``exclusive``) and help group;
- the TOML key ``batch_size`` in the command's section (or ``section``, e.g. the shared
  ``[connection]``) and the variable ``FEDMQ_<SECTION>_<KEY>`` (``fedmq.config`` layers
  them under the command line);
- the command line that gives a settings object back (``to_argv``: the demo starts its
  children with it);
- for the aggregator, the fingerprint of a run (``kept``: settings a run must keep).

A field without a ``Setting`` is not a command-line setting (e.g. a test's knob).
Checks that need a heavy library import it inside the function, so ``--help`` stays light.
"""

import argparse
import dataclasses
import difflib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from fedmq.schemas.messages import DpSgd

T = TypeVar("T")
S = TypeVar("S")
_KEY = "fedmq.setting"


@dataclasses.dataclass(frozen=True)
class Exclusive:
    """Options of which at most one may be given (with ``required``: exactly one)."""

    name: str
    required: bool = False


@dataclasses.dataclass(frozen=True)
class HelpGroup:
    """A heading of ``--help`` under which some options are listed."""

    title: str
    description: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    help: str | None
    parse: Callable[[str], Any] | None = None  # text -> value; None: the text itself
    show: Callable[[Any], str] = str  # value -> text that ``parse`` turns back into it
    flag: str | None = None  # default: --name-with-dashes
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # on when given (--fresh); true/false in a file or variable
    required: bool = False
    exclusive: Exclusive | None = None
    group: HelpGroup | None = None
    section: str | None = None  # None: the command's own section
    keywords: frozenset[str] = frozenset()  # words a path setting takes that are no path
    listable: bool = False  # a file may give a TOML array of strings (joined with ",")
    kept: str | None = None  # a run must keep it: its key in the aggregator's fingerprint
    # Values the fingerprint leaves out (a kept setting added later: a run kept before it
    # existed had the first of these, and resumes); the first is what a missing key means.
    unkept: tuple[Any, ...] = ()


def setting(default: Any = dataclasses.MISSING, **declared: Any) -> Any:
    """A dataclass field declared as a setting (the keywords are ``Setting``'s)."""
    return dataclasses.field(default=default, metadata={_KEY: Setting(**declared)})


@dataclasses.dataclass(frozen=True)
class Declared:
    """One setting of a command as declared: its field, default and ``Setting``."""

    name: str
    default: Any  # None for a setting without a default (required)
    setting: Setting
    section: str

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return env_name(self.section, self.name)

    @property
    def is_path(self) -> bool:
        return self.setting.parse is Path


def env_name(section: str, key: str) -> str:
    return f"FEDMQ_{section}_{key}".upper()


def declared(cls: type) -> dict[str, Declared]:
    """The settings of ``cls`` by name, in the order declared. ``cls.SECTION`` names the
    section of a config file its settings are in, unless a setting names another."""
    section = getattr(cls, "SECTION", "")
    found: dict[str, Declared] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(_KEY)
        if meta is None:
            continue
        default = None if field.default is dataclasses.MISSING else field.default
        found[field.name] = Declared(field.name, default, meta, meta.section or section)
    return found


def build(cls: type[S], values: Mapping[str, Any] | argparse.Namespace) -> S:
    """A settings object from parsed values (a Namespace or a mapping by name); values
    left out take the declared default."""
    given = vars(values) if isinstance(values, argparse.Namespace) else values
    return cls(**{name: given[name] for name in declared(cls) if name in given})


def to_argv(settings: object) -> list[str]:
    """The command-line options that give ``settings`` back when parsed: every setting
    whose value differs from its default."""
    argv: list[str] = []
    for name, item in declared(type(settings)).items():
        value = getattr(settings, name)
        if value == item.default:
            continue
        if item.setting.switch:
            if value:
                argv.append(item.flag)
            continue
        argv += [item.flag, item.setting.show(value)]
    return argv


# ---- the command line ------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the cause, and where the options are
    listed) instead of the whole usage text before it, and the settings declared for
    each subcommand (``add_command``)."""

    commands: dict[str, "Command"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = {}
        self._given: list[str] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._given = list(sys.argv[1:] if args is None else args)  # for ``error``
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        hint = self.did_you_mean(message)
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")

    def did_you_mean(self, message: str) -> str:
        """``; did you mean --broker?`` for an unknown option close to one of the
        subcommand's (argparse reports those from the top parser, which names none)."""
        unknown = message.removeprefix("unrecognized arguments: ")
        command = next((w for w in self._given if not w.startswith("-")), None)
        if unknown == message or command not in self.commands:
            return ""
        known = [o for a in self.commands[command].parser._actions for o in a.option_strings]
        for word in unknown.split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


@dataclasses.dataclass
class Command:
    """A subcommand's parser and the options made from its settings class."""

    cls: type
    parser: argparse.ArgumentParser
    actions: dict[str, argparse.Action]
    groups: list[tuple[Any, Exclusive]]  # argparse's group, as add_mutually_exclusive_group made it

    @property
    def settings(self) -> dict[str, Declared]:
        return declared(self.cls)

    @contextmanager
    def lenient(self, unset: object) -> Iterator[None]:
        """While parsing: a left-out option gets ``unset`` (so it is told apart from one
        given its default value) and none is required (the environment or a file may
        give it); as declared again afterwards."""
        saved = [(a, a.default, a.required) for a in self.actions.values()]
        try:
            for action in self.actions.values():
                action.default, action.required = unset, False
            for group, _ in self.groups:
                group.required = False
            yield
        finally:
            for action, default, required in saved:
                action.default, action.required = default, required
            for group, exclusive in self.groups:
                group.required = exclusive.required


def add_command(
    top: Parser,
    subparsers: Any,  # what top.add_subparsers() returned
    name: str,
    cls: type,
    **parser_options: Any,
) -> argparse.ArgumentParser:
    """The subcommand ``name`` with an option for each setting of ``cls``."""
    parser = subparsers.add_parser(name, **parser_options)
    top.commands[name] = add_options(parser, cls)
    return parser


def add_options(parser: argparse.ArgumentParser, cls: type) -> Command:
    """An option on ``parser`` for each setting of ``cls``."""
    actions: dict[str, argparse.Action] = {}
    groups: dict[Any, Any] = {}
    exclusive: list[tuple[Any, Exclusive]] = []
    for name, item in declared(cls).items():
        meta = item.setting
        target: Any = parser
        if meta.group is not None:
            if meta.group not in groups:
                groups[meta.group] = parser.add_argument_group(
                    meta.group.title, meta.group.description
                )
            target = groups[meta.group]
        if meta.exclusive is not None:
            if meta.exclusive not in groups:
                group = target.add_mutually_exclusive_group(required=meta.exclusive.required)
                groups[meta.exclusive] = group
                exclusive.append((group, meta.exclusive))
            target = groups[meta.exclusive]
        options: dict[str, Any] = {"dest": name, "default": item.default, "help": meta.help}
        if meta.switch:
            options["action"] = "store_true"
        else:
            if meta.parse is not None:
                options["type"] = meta.parse
            if meta.metavar is not None:
                options["metavar"] = meta.metavar
            if meta.choices is not None:
                options["choices"] = list(meta.choices)
        if meta.required:
            options["required"] = True
        actions[name] = target.add_argument(item.flag, **options)
    return Command(cls, parser, actions, exclusive)


# ---- checks: text in, value out, one line on error ---------------------------------------


def usage_errors(check: Callable[[str], T]) -> Callable[[str], T]:
    """A check from a parser of ours: its ValueError becomes the one-line usage error
    (parsers are imported inside ``check``, so ``--help`` loads no JAX)."""

    @functools.wraps(check)
    def convert(text: str) -> T:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


MAX_EVAL_FRACTION = 0.5  # schemas.messages.MAX_EVAL_FRACTION (test_settings checks)


def eval_fraction(text: str) -> float | None:
    """``--eval-fraction``: a number in [0, 0.5], or ``auto`` (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= MAX_EVAL_FRACTION:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a fraction in [0, {MAX_EVAL_FRACTION}] or auto"
        )
    return value


def show_auto(value: object) -> str:
    """``auto`` for None (``--eval-fraction``)."""
    return "auto" if value is None else str(value)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (``--train-delay``'s seconds)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def proximal_mu(text: str) -> float:
    """``--proximal-mu``: a finite number >= 0 (FedProx's mu; 0: off)."""
    return non_negative_float(text)


TRAIN_DELAY_HELP = (
    "SIMULATION ONLY, for trying heterogeneous fleets on one machine: after each local "
    "training the node waits SECONDS more before it compresses and publishes its update, as "
    "a slower device would (counted in the update's train_seconds; a stop cuts the wait "
    "short; default 0: none). Not for real devices"
)


@usage_errors
def node_id_list(text: str) -> tuple[str, ...]:
    from fedmq.schemas.topics import validate_name

    return tuple(sorted({validate_name("node id", i.strip()) for i in text.split(",")}))


@usage_errors
def partition_spec(text: str) -> str:
    from fedmq.datasets import parse_partition

    parse_partition(text)
    return text


@usage_errors
def model_name(text: str) -> str:
    from fedmq.models import get_model

    get_model(text)
    return text


@usage_errors
def task_spec(text: str) -> str:
    from fedmq.tasks.registry import check_spec

    return check_spec(text)


TASK_HELP = (
    "what the federation learns: a built-in task (digits-mlp, digits-mlp-large, "
    "mlp:IN-HIDDEN-...-CLASSES, and the examples digits-cnn, activity-cnn, diabetes-mlp), "
    "MODULE:ATTRIBUTE of a fedmq.Task (the module importable "
    "here, e.g. my_tasks.py in the working directory), or a name registered under the "
    "fedmq.tasks entry points (docs/tasks.md)"
)
MODEL_HELP = "the old spelling of --task, for the built-in MLPs"
DEFAULT_TASK = "digits-mlp"


def chosen_task(task: str | None, model: str | None) -> str:
    """The task of ``--task`` and its old spelling ``--model``: the one given (default
    digits-mlp); ValueError if both are given and differ."""
    if task is not None and model is not None and task != model:
        raise ValueError(
            f"--model {model} and --task {task} name different tasks: give one "
            "(--model is the old spelling of --task)"
        )
    return task or model or DEFAULT_TASK


@usage_errors
def compression_spec(text: str) -> str:
    from fedmq.compression import parse_spec

    return str(parse_spec(text))


NO_DOWNLINK_COMPRESSION = "none"  # the lossless xor form of global_delta (PROTOCOL 8.6)


def spec_or(word: str, hint: str) -> Callable[[str], str]:
    """A parser for an option that takes a SPEC (made canonical) or one ``word`` for its
    other choice; ``hint`` is what a wrong value's message says of that word."""

    def parse(text: str) -> str:
        if text.strip().lower() == word:
            return word
        try:
            return compression_spec(text)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{error}; or {hint}") from None

    return parse


# ``--downlink-compression``: none (the lossless form), or a SPEC.
downlink_spec = spec_or(NO_DOWNLINK_COMPRESSION, "none (the lossless form)")

SAME_AS_DOWNLINK = "same"  # --final-downlink-compression: the final model as every other

# ``--final-downlink-compression``: same (as --downlink-compression), or a SPEC.
final_downlink_spec = spec_or(SAME_AS_DOWNLINK, SAME_AS_DOWNLINK)


def check_final_downlink(downlink: str, final: str) -> None:
    """ValueError if the final model cannot travel as ``final``: it needs a compressed
    downlink, and keeps error feedback's residual if the downlink has one (what the
    final model is for: sending what earlier versions left out)."""
    if final == SAME_AS_DOWNLINK:
        return
    if downlink == NO_DOWNLINK_COMPRESSION:
        raise ValueError(
            "--final-downlink-compression needs --downlink-compression SPEC (the final "
            "model's SPEC replaces that one's for the final model only)"
        )
    from fedmq.compression import parse_spec

    if parse_spec(downlink).error_feedback and not parse_spec(final).error_feedback:
        raise ValueError(
            f"--final-downlink-compression {final}: add ef, as --downlink-compression "
            f"{downlink} has: the final model is where the residual is sent"
        )


def show_list(value: tuple[str, ...]) -> str:
    return ",".join(value)


COMPRESSION_HELP = (
    "how nodes compress their deltas: dense (default), fp16, int8, int4, sign, topk:F (per "
    "tensor) or gtopk:F (over the whole delta), joined with + and optionally ef (error "
    "feedback), flat (one Elias-Fano coded run for the whole sparse delta; needs topk or "
    "gtopk) and zlib, e.g. topk:0.035+sign+ef+flat (100x fewer bytes)"
)

DOWNLINK_HELP = (
    "how the aggregator compresses each new global model's difference from the previous one "
    "for nodes (the same SPEC grammar; ef keeps the aggregator's residual in its checkpoint): "
    "the new model is then exactly what every node rebuilds, e.g. topk:0.035+sign+ef+flat "
    "(default none: the lossless compact form)"
)

FINAL_DOWNLINK_HELP = (
    "with --downlink-compression: how the final model (after the last round) goes to the "
    "nodes, a SPEC with a larger k that sends what error feedback still holds back, e.g. "
    "gtopk:0.1+sign+ef+flat (default same: as every other model)"
)

EVAL_FRACTION_HELP = (
    "federated evaluation: each node holds out this fraction (at most 0.5) of its examples, "
    "fixed for the run, and reports the metrics of the model it received on them; 0: none "
    "(default auto: 0 when the aggregator has a test set, 0.2 when it has none)"
)

PROXIMAL_MU_HELP = (
    "FedProx: nodes add (MU/2) x the squared distance between their parameters and the "
    "round's global model to the task's loss, which holds back local drift on uneven data "
    "(Li et al. try 0.001 to 1); announced in the plan (default 0: off, the task's loss alone)"
)

# ---- --mode async: the buffer and staleness (aggregator.buffer) ---------------------------

MODES = ("sync", "async")  # schemas.messages.MODES (test_settings checks)
DEFAULT_STALENESS = "poly:0.5"  # aggregator.buffer.DEFAULT_EXPONENT
DEFAULT_MAX_STALENESS = 20  # aggregator.buffer.DEFAULT_MAX_STALENESS


def mode_name(text: str) -> str:
    """``--mode``: sync or async."""
    mode = text.strip().lower()
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not sync or async")
    return mode


def staleness_exponent(text: str) -> float:
    """``poly:A`` -> A, a finite number >= 0; ValueError (one line) otherwise."""
    name, colon, number = text.strip().partition(":")
    try:
        value = float(number) if colon and name.strip().lower() == "poly" else -1.0
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{text!r} is not poly:A with A a number >= 0 (the weight (1 + staleness) ** -A), "
            "e.g. poly:0.5"
        )
    return value


@usage_errors
def staleness_spec(text: str) -> str:
    """``--staleness``: the canonical ``poly:A``."""
    return f"poly:{staleness_exponent(text)!r}"


def buffer_size(buffer: int | None, nodes: int) -> int:
    """``--buffer``, or half of ``--nodes`` (at least 1)."""
    return buffer if buffer is not None else max(1, nodes // 2)


def sampled(nodes: int, fraction: float) -> int:
    """Nodes a version asks of ``nodes`` at ``fraction`` (aggregator.rounds.select_nodes)."""
    return min(nodes, max(1, math.ceil(fraction * nodes)))


def check_buffer(
    mode: str, buffer: int | None, nodes: int | None, sample_fraction: float = 1.0
) -> None:
    """ValueError (one line, with the fix) for ``--buffer`` without ``--mode async``, or a
    buffer that would never fill: every node trains a version at most once, so a buffer
    larger than the nodes that can train on one version would wait forever (``nodes``
    None: not known yet, not checked)."""
    if mode == "sync" and buffer is not None:
        raise ValueError(
            f"--buffer {buffer} is for --mode async: add --mode async, or leave --buffer "
            "out for rounds"
        )
    if mode != "async" or nodes is None:
        return
    size = buffer_size(buffer, nodes)
    trainers = sampled(nodes, sample_fraction)
    if size > trainers:
        asked = (
            f"--nodes {nodes}"
            if sample_fraction >= 1
            else f"the {trainers} nodes --sample-fraction {sample_fraction} asks of --nodes {nodes}"
        )
        raise ValueError(
            f"--buffer {size} is more updates than {asked} can send on one version, so no "
            f"version would ever be made: give --buffer {trainers} or less"
        )


MODE_HELP = (
    "how model versions are made: sync (default: rounds; a round waits for its nodes, or "
    "its deadline and quorum) or async (FedBuff: nodes train whenever they are free, and a "
    "version is made every --buffer accepted updates, whatever version each was trained "
    "on; docs/async.md)"
)
BUFFER_HELP = (
    "--mode async: make a version every K accepted updates (default: half of --nodes, at "
    "least 1; at most --nodes, or the nodes sampled per version)"
)
STALENESS_HELP = (
    "--mode async: an update trained on version v arriving at version t has its delta "
    "scaled by (1 + t - v) ** -A (default poly:0.5; poly:0 takes every update as sent)"
)
MAX_STALENESS_HELP = (
    "--mode async: reject (stale) updates trained more than S versions before the open one "
    f"(default {DEFAULT_MAX_STALENESS})"
)


# ---- --server-optimizer: the grammar (aggregator.optimizer builds the transform) ----------

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
_SERVER_OPTIMIZER_FORMS = "fedavg, fedavgm:LR,MOMENTUM, fedadam:LR, fedyogi:LR or fedadagrad:LR"


@dataclasses.dataclass(frozen=True)
class ServerOptimizerSpec:
    """A server optimiser as ``--server-optimizer`` names it (Reddi et al., "Adaptive
    Federated Optimization"): its name, server learning rate and, for fedavgm, momentum.
    ``str`` gives the canonical text, kept in a run's fingerprint."""

    name: str = "fedavg"
    learning_rate: float = 1.0
    momentum: float | None = None  # fedavgm only

    def __str__(self) -> str:
        if self.name == "fedavg":
            return "fedavg"
        if self.name == "fedavgm":
            return f"fedavgm:{self.learning_rate!r},{self.momentum!r}"
        return f"{self.name}:{self.learning_rate!r}"


def _spec_number(text: str, spec: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if what == "momentum":
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"{spec}: the momentum {text!r} is not a number in [0, 1), e.g. fedavgm:1,0.9"
            )
    elif not (math.isfinite(value) and value > 0):
        raise ValueError(f"{spec}: the learning rate {text!r} is not a finite number > 0")
    return value


def parse_server_optimizer(text: str) -> ServerOptimizerSpec:
    """``fedavg``, ``fedavgm:LR,MOMENTUM``, ``fedadam:LR``, ``fedyogi:LR`` or
    ``fedadagrad:LR``; ValueError (one line: what is wrong, the forms that are right)."""
    spec = text.strip()
    name, _, arguments = spec.partition(":")
    name = name.strip().lower()
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {text!r}: use {_SERVER_OPTIMIZER_FORMS}")
    parts = [part.strip() for part in arguments.split(",")] if arguments.strip() else []
    if name == "fedavg":
        if parts:
            raise ValueError(f"{spec}: fedavg takes no parameters (its server rate is 1)")
        return ServerOptimizerSpec()
    wanted = 2 if name == "fedavgm" else 1
    if len(parts) != wanted:
        form = (
            "fedavgm:LR,MOMENTUM, e.g. fedavgm:1,0.9"
            if name == "fedavgm"
            else (f"{name}:LR, e.g. {name}:0.01")
        )
        raise ValueError(f"{spec}: {name} needs {form}")
    rate = _spec_number(parts[0], spec, "learning rate")
    momentum = _spec_number(parts[1], spec, "momentum") if name == "fedavgm" else None
    return ServerOptimizerSpec(name, rate, momentum)


@usage_errors
def server_optimizer_spec(text: str) -> str:
    """``--server-optimizer``: the canonical text of a valid spec."""
    return str(parse_server_optimizer(text))


SERVER_OPTIMIZER_HELP = (
    "the server update (Reddi et al., Adaptive Federated Optimization): fedavg (default: the "
    "mean delta added), or the mean delta as a pseudo-gradient of fedavgm:LR,MOMENTUM (SGD "
    "with momentum), fedadam:LR, fedyogi:LR or fedadagrad:LR, e.g. fedadam:0.01; its state "
    "is checkpointed with the model, and a run keeps it (docs/aggregation.md)"
)


def dp_sgd_spec(text: str) -> str:
    """``--dp-sgd noise=Z,clip=C``: both finite and > 0, in either order; the canonical
    text (``noise=Z,clip=C``, Python's shortest float text) is what is kept."""
    return str_of_dp_sgd(parse_dp_sgd(text))


def dp_fedavg_spec(text: str) -> str:
    """``--dp-fedavg noise=Z,clip=C`` or ``noise=Z,clip=adaptive`` (adaptive clipping,
    ``aggregator.dp_fedavg``); the canonical text is what is kept."""
    parts = [part.strip() for part in text.split(",")]
    adaptive = "clip=adaptive" in parts
    try:
        dp = parse_dp_sgd(",".join("clip=1" if p == "clip=adaptive" else p for p in parts))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not noise=Z,clip=C or noise=Z,clip=adaptive with numbers > 0 "
            "(e.g. noise=1.1,clip=1.0)"
        ) from None
    return f"noise={dp.noise!r},clip=adaptive" if adaptive else str_of_dp_sgd(dp)


def parse_dp_sgd(text: str) -> "DpSgd":
    """The plan's ``dp_sgd`` from ``noise=Z,clip=C``; ArgumentTypeError naming the fix."""
    from fedmq.schemas.messages import DpSgd

    values: dict[str, float] = {}
    for part in text.split(","):
        key, equals, number = part.strip().partition("=")
        try:
            value = float(number) if equals else math.nan
        except ValueError:
            value = math.nan
        if (
            key not in ("noise", "clip")
            or key in values
            or not (math.isfinite(value) and value > 0)
        ):
            values = {}
            break
        values[key] = value
    if set(values) != {"noise", "clip"}:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not noise=Z,clip=C with numbers > 0 (e.g. noise=1.1,clip=1.0)"
        )
    return DpSgd(noise=values["noise"], clip=values["clip"])


def str_of_dp_sgd(dp: "DpSgd | Any") -> str:
    """``noise=Z,clip=C`` of anything with ``noise`` and ``clip`` (DP-SGD, DP-FedAvg)."""
    return f"noise={dp.noise!r},clip={dp.clip!r}"


def max_epsilon(text: str) -> float:
    """``--max-epsilon``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0 (e.g. 8)")
    return value


def dp_delta(text: str) -> float:
    """``--dp-delta``: a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1 (e.g. 1e-5)")
    return value


DP_SGD_HELP = (
    "example-level differential privacy on the nodes (DP-SGD): each example's gradient "
    "clipped to L2 norm C, Gaussian noise of standard deviation Z x C added to each "
    "Poisson-sampled batch's sum; announced in the plan, nodes account the epsilon they "
    "spend (default: off)"
)
