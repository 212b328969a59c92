"""The aggregator's settings, declared once (``fedmq.settings``): its options, its keys
in ``[connection]`` and ``[aggregator]``, its ``FEDMQ_AGGREGATOR_*`` variables, the
command line the demo starts it with, and the fingerprint of a run (``kept``)."""

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fedmq.logs import LogSettings
from fedmq.mqtt import BrokerAddress, ConnectionSettings, Credentials
from fedmq.settings import (
    BUFFER_HELP,
    COMPRESSION_HELP,
    DEFAULT_MAX_STALENESS,
    DEFAULT_STALENESS,
    DOWNLINK_HELP,
    DP_SGD_HELP,
    EVAL_FRACTION_HELP,
    FINAL_DOWNLINK_HELP,
    MAX_STALENESS_HELP,
    MODE_HELP,
    MODEL_HELP,
    PROXIMAL_MU_HELP,
    SERVER_OPTIMIZER_HELP,
    STALENESS_HELP,
    TASK_HELP,
    Exclusive,
    HelpGroup,
    buffer_size,
    check_buffer,
    check_final_downlink,
    chosen_task,
    compression_spec,
    count,
    declared,
    downlink_spec,
    dp_fedavg_spec,
    dp_sgd_spec,
    eval_fraction,
    final_downlink_spec,
    fraction,
    mode_name,
    model_name,
    node_id_list,
    non_negative_float,
    positive_float,
    positive_int,
    proximal_mu,
    server_optimizer_spec,
    setting,
    show_auto,
    show_list,
    staleness_spec,
    task_spec,
    usage_errors,
)

# How long the end of a run waits for the nodes' reports of the final model (seconds).
DEFAULT_FINAL_DELIVERY_WAIT = 5.0


def _deadline(text: str) -> float | None:
    """``--round-timeout``: seconds, or ``none`` (no deadline)."""
    if text.strip().lower() == "none":
        return None
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0 or none") from None


def _show_deadline(value: object) -> str:
    """``none`` for None (``--round-timeout``, ``--test-data``)."""
    return "none" if value is None else str(value)


def eval_fraction_of(setting: float | None, *, has_test_set: bool, private: bool = False) -> float:
    """The plan's ``eval_fraction``: the one given, or for ``auto`` (None) 0 when the
    aggregator evaluates centrally or runs DP-SGD (``private``: a node's metrics of its
    held-out examples are not private, so DP-SGD nodes refuse to send them),
    ``AUTO_EVAL_FRACTION`` when it has no test set."""
    if setting is not None:
        if private and setting > 0:
            raise ValueError(
                f"--eval-fraction {setting} with --dp-sgd: the held-out examples' metrics "
                "would be sent without differential privacy; leave --eval-fraction auto (0)"
            )
        return setting
    return 0.0 if has_test_set or private else AUTO_EVAL_FRACTION


def _test_data(text: str) -> str | None:
    """``--test-data``: auto, digits, a path to an .npz, or none (no evaluation)."""
    return None if text == "none" else text


@usage_errors
def _aggregation(text: str) -> str:
    from fedmq.aggregator.robust import parse_rule

    return str(parse_rule(text))


@usage_errors
def _site_name(text: str) -> str:
    from fedmq.schemas.topics import validate_name

    return validate_name("site name", text)


@usage_errors
def _upstream(text: str) -> BrokerAddress:
    return BrokerAddress.parse(text)


def _show_address(value: object) -> str:
    return "" if not isinstance(value, BrokerAddress) else f"{value.host}:{value.port}"


_RESTART = Exclusive("restart")
_LEVEL = Exclusive("hierarchy")  # a site aggregator, or the root of sites
_SITES = HelpGroup(
    "site aggregators",
    "a site aggregator folds its site broker's nodes' updates into one update per root "
    "round, sent to the root's broker (docs/hierarchy.md)",
)
# robust.DEFAULT and rounds.DEFAULT_DEADLINE_SECONDS, written out so that reading the
# settings (``fedmq --help``) loads no numpy; tests/unit/test_settings.py checks they agree.
DEFAULT_AGGREGATION = "fedavg+clip-median:2+cap-examples:1.25"
DEFAULT_ROUND_TIMEOUT = 300.0
AUTO_EVAL_FRACTION = 0.2  # --eval-fraction auto without a test set


@dataclass(frozen=True, kw_only=True)
class AggregatorSettings(LogSettings, ConnectionSettings):
    """``fedmq aggregator``'s settings. ``kept``: settings a run must keep across
    restarts, the checkpoint's fingerprint (``run_fingerprint``)."""

    SECTION: ClassVar[str] = "aggregator"

    # The run's task; its name is kept under "model" in the fingerprint, as before --task.
    task: str | None = setting(  # None: --model, or digits-mlp (task_spec)
        None,
        kept="model",
        parse=task_spec,
        metavar="SPEC",
        help=TASK_HELP + " (default digits-mlp)",
    )
    model: str | None = setting(None, parse=model_name, help=MODEL_HELP)
    nodes: int = setting(10, parse=positive_int, help="nodes expected each round (default 10)")
    min_nodes: int | None = setting(  # None: more than half of nodes (default_quorum)
        None, parse=positive_int, help="quorum at the deadline (default: more than half of --nodes)"
    )
    round_timeout: float | None = setting(  # None: wait for every expected node
        DEFAULT_ROUND_TIMEOUT,
        parse=_deadline,
        show=_show_deadline,
        metavar="SECONDS",
        help="deadline of a round: past it, the round closes with the updates it has once "
        "--min-nodes have reported (default 300; none: wait for every expected node)",
    )
    rounds: int = setting(
        30,
        parse=positive_int,
        help="rounds to run (default 30); with --mode async, model versions to make",
    )
    # Not kept: it changes no model, only how long the end of a run waits.
    final_delivery_wait: float = setting(
        DEFAULT_FINAL_DELIVERY_WAIT,
        parse=non_negative_float,
        metavar="SECONDS",
        help="after the final model, wait at most SECONDS for every node present to report "
        "it received it (status done), to count the bytes delivered to them in the server's "
        "done status and the report; the done status comes after the wait "
        f"(default {DEFAULT_FINAL_DELIVERY_WAIT:g}; 0: no wait, no count)",
    )
    # Kept: a run's versions are made one way (the checkpoint's memory differs); left out
    # of the fingerprint for sync, so a run kept before asynchronous mode resumes.
    mode: str = setting(
        "sync", kept="mode", unkept=("sync",), parse=mode_name, metavar="sync|async", help=MODE_HELP
    )
    buffer: int | None = setting(  # None: half of --nodes (buffer_size)
        None, parse=positive_int, metavar="K", help=BUFFER_HELP
    )
    staleness: str = setting(
        DEFAULT_STALENESS, parse=staleness_spec, metavar="poly:A", help=STALENESS_HELP
    )
    max_staleness: int = setting(
        DEFAULT_MAX_STALENESS, parse=count, metavar="S", help=MAX_STALENESS_HELP
    )
    learning_rate: float = setting(
        0.1, kept="plan", parse=positive_float, help="nodes' SGD rate (default 0.1)"
    )
    batch_size: int = setting(
        16, kept="plan", parse=positive_int, help="nodes' batch size (default 16)"
    )
    local_epochs: int = setting(
        1, kept="plan", parse=positive_int, help="epochs per round (default 1)"
    )
    seed: int = setting(
        0, kept="plan", parse=int, help="initial model and shuffling seed (default 0)"
    )
    compression: str = setting(
        "dense", kept="compression", parse=compression_spec, metavar="SPEC", help=COMPRESSION_HELP
    )
    # Not kept, like the aggregation rule: the server's choice (its residual is in the
    # checkpoint; a run resumed with another SPEC starts it again from zero).
    downlink_compression: str = setting(
        "none", parse=downlink_spec, metavar="SPEC|none", help=DOWNLINK_HELP
    )
    final_downlink_compression: str = setting(
        "same", parse=final_downlink_spec, metavar="SPEC|same", help=FINAL_DOWNLINK_HELP
    )
    test_data: str | None = setting(  # "auto", "digits", a path to an .npz, or None
        "auto",
        parse=_test_data,
        show=_show_deadline,
        keywords=frozenset({"auto", "digits", "none"}),
        metavar="auto|digits|PATH.npz|none",
        help="evaluation set for the central test metrics: auto (default: the digits test "
        "split for the digits MLPs, a built-in example task's own test split, none for any "
        "other task), digits, an .npz with x and y, or none",
    )
    eval_fraction: float | None = setting(  # None: auto (eval_fraction_of)
        None,
        kept="eval_fraction",
        unkept=(0.0,),
        parse=eval_fraction,
        show=show_auto,
        metavar="F|auto",
        help=EVAL_FRACTION_HELP,
    )
    proximal_mu: float = setting(
        0.0,
        kept="proximal_mu",
        unkept=(0.0,),
        parse=proximal_mu,
        metavar="MU",
        help=PROXIMAL_MU_HELP,
    )
    dp_fedavg: str | None = setting(  # None: off; else the canonical noise=Z,clip=C
        None,
        kept="dp_fedavg",
        unkept=(None,),
        parse=dp_fedavg_spec,
        metavar="noise=Z,clip=C|adaptive",
        help="user-level differential privacy at the aggregator (DP-FedAvg): each node's "
        "delta clipped to L2 norm C, one vote per node, Gaussian noise Z x C on the sum, "
        "the run's epsilon in every round's metrics; clip=adaptive: C follows the median "
        "update norm (Andrew et al. 2021); with --aggregation fedavg in rounds "
        "only (default: off)",
    )
    dp_sgd: str | None = setting(  # None: off; else the canonical noise=Z,clip=C
        None,
        kept="dp_sgd",
        unkept=(None,),
        parse=dp_sgd_spec,
        metavar="noise=Z,clip=C",
        help=DP_SGD_HELP,
    )
    max_update_bytes: int | None = setting(
        None,
        parse=positive_int,
        help="reject larger updates unread (default: dense model size + 64 KiB)",
    )
    report: Path | None = setting(None, parse=Path, help="write report.json here at the end")
    save_model: Path | None = setting(  # fedmq.model_file; written by aggregator/app.py
        None,
        parse=Path,
        metavar="PATH.msgpack|PATH.npz",
        help="keep the newest global model in this file, replaced atomically after every "
        "model version (.msgpack: the global model message; .npz: one array per tensor; "
        "fedmq.load_params reads both)",
    )
    state_dir: Path | None = setting(  # None (from Python only): no crash recovery
        Path(".fedmq-aggregator"),
        parse=Path,
        help="checkpoint and journal of the run, resumed after a crash or restart; "
        "locked while the aggregator runs (default ./.fedmq-aggregator)",
    )
    fresh: bool = setting(
        False,
        switch=True,
        exclusive=_RESTART,
        help="discard the run kept in --state-dir and start a new one",
    )
    rollback_to: int | None = setting(
        None,
        parse=positive_int,
        exclusive=_RESTART,
        metavar="ROUND",
        help="continue the run kept in --state-dir from the model that opened ROUND (one "
        "of the last 30 opened), forgetting the rounds after it; may come with another "
        "--aggregation, e.g. to leave a poisoned run. Give it once: every start with it "
        "rolls back again",
    )
    node_ids: tuple[str, ...] | None = setting(  # the fleet; None: any well-formed id
        None,
        parse=node_id_list,
        show=show_list,
        listable=True,
        metavar="ID,ID,...",
        help="the fleet's node ids: updates from any other id are rejected (unknown_node), "
        "and --sample-fraction draws from them (default: any id; sampling draws from the "
        "nodes online)",
    )
    sample_fraction: float = setting(
        1.0,
        parse=fraction,
        metavar="F",
        help="ask a seeded random fraction F of the nodes to train each round, announced "
        "in the global model (default 1: every node)",
    )
    aggregation: str = setting(  # a RULE of aggregator.robust (docs/aggregation.md)
        DEFAULT_AGGREGATION,
        parse=_aggregation,
        metavar="RULE",
        help="how a round's updates are combined: fedavg (weighted by examples), median or "
        "trimmed-mean:BETA (coordinate-wise, one vote per node, BETA < 0.5 cut from each "
        "side; they hold the round's updates in memory), optionally with +clip-norm:X or "
        "+clip-median:F (clip each update's L2 norm to X, or to F x the round's median "
        "norm) and, for fedavg, +cap-examples:C (count no node for more than C x the "
        "round's median num_examples). Default fedavg+clip-median:2+cap-examples:1.25: no "
        "single node can outweigh the fleet; plain fedavg trusts every claim "
        "(docs/aggregation.md)",
    )
    clip_norm: float | None = setting(
        None,
        parse=positive_float,
        metavar="X",
        help="clip each update's delta to L2 norm X before aggregating "
        "(the same as adding +clip-norm:X to --aggregation; replaces the default's "
        "clip-median:2)",
    )
    # Kept (a run's optimiser state belongs to it), but left out of the fingerprint for
    # fedavg, so a run kept before server optimisers resumes (``unkept``).
    server_optimizer: str = setting(
        "fedavg",
        kept="server_optimizer",
        unkept=("fedavg",),
        parse=server_optimizer_spec,
        metavar="SPEC",
        help=SERVER_OPTIMIZER_HELP,
    )

    site: str | None = setting(
        None,
        parse=_site_name,
        metavar="NAME",
        group=_SITES,
        exclusive=_LEVEL,
        help="run as the site aggregator NAME (its node id at the root): take the root's "
        "model from --broker (the site broker, bridged to the root's: fedmq broker init "
        "--site), fold the site's nodes' updates of each root round into one update and "
        "send it to --upstream; publishes no model",
    )
    sites: bool = setting(
        False,
        switch=True,
        group=_SITES,
        exclusive=_LEVEL,
        help="the root of site aggregators: the updates come from sites (compressed as "
        "--upstream-compression); refuses rules that cannot be split over sites",
    )
    upstream: BrokerAddress | None = setting(
        None,
        parse=_upstream,
        show=_show_address,
        metavar="HOST:PORT",
        group=_SITES,
        help="with --site: the root's broker, where the site's update goes (QoS 1)",
    )
    upstream_compression: str = setting(
        "dense",
        parse=compression_spec,
        metavar="SPEC",
        group=_SITES,
        help="with --site: how the site compresses its update for the root (the nodes' "
        "SPEC grammar; ef keeps the site's residual in its state directory); with --sites: "
        "what the root accepts from sites (default dense: the root's model then equals "
        "flat FedAvg of the nodes' updates up to float32 rounding)",
    )
    upstream_username: str | None = setting(
        None, metavar="NAME", group=_SITES, help="with --site: MQTT username at the root's broker"
    )
    upstream_password_file: Path | None = setting(
        None, parse=Path, metavar="PATH", group=_SITES,
        help="with --site: first line: password at the root's broker",
    )  # fmt: skip
    upstream_tls_ca: Path | None = setting(
        None, parse=Path, metavar="PATH", group=_SITES,
        help="with --site: CA certificate of the root's broker: use TLS",
    )  # fmt: skip

    def __post_init__(self) -> None:
        chosen_task(self.task, self.model)  # both given and different: ValueError
        check_final_downlink(self.downlink_compression, self.final_downlink_compression)
        check_buffer(self.mode, self.buffer, self.nodes, self.sample_fraction)
        if (self.site is None) != (self.upstream is None):
            raise ValueError(
                "--site NAME and --upstream HOST:PORT (the root's broker) come together"
            )
        level = "--site" if self.site is not None else "--sites" if self.sites else None
        if level is not None and self.mode != "sync":
            raise ValueError(f"{level}: site aggregators follow the root's rounds: --mode sync")
        if level is not None and self.sample_fraction < 1:
            raise ValueError(
                f"{level}: --sample-fraction would sample sites (or, at a site, nodes the "
                "root's model names): not supported with site aggregators"
            )

    @property
    def upstream_broker(self) -> BrokerAddress | None:
        """``--upstream`` with its credentials; ValueError if they cannot work."""
        if self.upstream is None:
            return None
        credentials = Credentials(
            username=self.upstream_username,
            password_file=self.upstream_password_file,
            ca_file=self.upstream_tls_ca,
        )
        problem = credentials.problem()
        if problem is not None:
            raise ValueError(f"upstream credentials: {problem}")
        return BrokerAddress(self.upstream.host, self.upstream.port, credentials)

    @property
    def buffer_size(self) -> int:
        """``--buffer``, or half of ``--nodes`` (at least 1)."""
        return buffer_size(self.buffer, self.nodes)

    @property
    def task_spec(self) -> str:
        """``--task``, or its old spelling ``--model``, or digits-mlp."""
        return chosen_task(self.task, self.model)


# ---- the fingerprint of a run: the settings marked ``kept`` ------------------------------


def _kept() -> dict[str, list[str]]:
    """The fingerprint's keys, each with the settings stored under it in declaration
    order: one setting is stored as its value, several (the training plan) as a list."""
    keys: dict[str, list[str]] = {}
    for name, item in declared(AggregatorSettings).items():
        if item.setting.kept is not None:
            keys.setdefault(item.setting.kept, []).append(name)
    return keys


def run_fingerprint(values: Mapping[str, Any]) -> dict[str, Any]:
    """What a run must keep across restarts, as the checkpoint stores it, from the values
    of the ``kept`` settings by name: ``{"federation", "model", "plan": [learning_rate,
    batch_size, local_epochs, seed], "compression"}``, and ``"eval_fraction"`` and
    ``"proximal_mu"`` each only when it is not 0 (a run kept before federated evaluation
    or FedProx resumes), ``"server_optimizer"`` only when it is not fedavg (likewise),
    ``"mode"`` only when async, ``"dp_sgd"`` and ``"dp_fedavg"`` only when set: each
    setting's ``unkept`` values are left out (docs/PROTOCOL.md 13.1)."""
    settings = declared(AggregatorSettings)
    fingerprint: dict[str, Any] = {}
    for key, names in _kept().items():
        if len(names) > 1:
            fingerprint[key] = [values[name] for name in names]
        elif values[names[0]] not in settings[names[0]].setting.unkept:
            fingerprint[key] = values[names[0]]
    return fingerprint


def _by_option(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint's values by the option that sets them (``--batch-size``); a key no
    setting is kept under stays as it is."""
    settings, kept = declared(AggregatorSettings), _kept()
    flat: dict[str, Any] = {}
    for key, value in fingerprint.items():
        names = kept.get(key, [])
        if len(names) > 1 and isinstance(value, list) and len(value) == len(names):
            flat.update(
                (settings[name].flag, item) for name, item in zip(names, value, strict=True)
            )
        elif len(names) == 1:
            flat[settings[names[0]].flag] = value
        else:
            flat[key] = value
    for key, names in kept.items():  # a key left out holds its setting's first unkept value
        item = settings[names[0]]
        if len(names) == 1 and item.setting.unkept and key not in fingerprint:
            flat[item.flag] = item.setting.unkept[0]
    return flat


def fingerprint_mismatch(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[str, Any, Any] | None:
    """The first setting that differs between the saved run and this configuration, as
    (option, kept value, new value), or None."""
    kept, now = _by_option(saved), _by_option(current)
    for option in sorted(set(kept) | set(now)):
        if kept.get(option) != now.get(option):
            return option, kept.get(option), now.get(option)
    return None
