"""Each role's settings are declared once (fedmq.settings): the command-line options, the
TOML keys, the FEDMQ_<SECTION>_<KEY> variables, the demo's child command lines and the
aggregator's run fingerprint all derive from the dataclass fields."""

import dataclasses
import threading
from pathlib import Path

import msgpack
import pytest

from fedmq import cli, config, settings
from fedmq.aggregator.app import build_aggregator
from fedmq.aggregator.settings import AggregatorSettings, fingerprint_mismatch, run_fingerprint
from fedmq.demo import child_argv
from fedmq.demo_settings import DemoSettings
from fedmq.mqtt import BrokerAddress
from fedmq.node.settings import NodeSettings

# A valid text for each setting whose default does not make one.
SAMPLES = {
    "min_nodes": "3",
    "max_update_bytes": "100000",
    "report": "r.json",
    "rollback_to": "2",
    "node_ids": "pi-01,pi-02",
    "clip_norm": "1.5",
    "username": "u",
    "password_file": "pw",
    "tls_ca": "ca.crt",
    "tls_cert": "c.crt",
    "tls_key": "c.key",
    "node_id": "n1",
    "data": "d.npz",
    "demo_shard": "1/2",
    "state_dir": "s",
    "timeout": "5",
    "mosquitto_conf": "m.conf",
    "log_level": "debug",
    "test_data": "t.npz",
    "task": "digits-mlp-large",
    "model": "digits-mlp-large",
    "round_timeout": "none",
    "buffer": "3",
    "site": "north",
    "upstream": "127.0.0.1:1884",
    "upstream_username": "u",
    "upstream_password_file": "pw",
    "upstream_tls_ca": "ca.crt",
    "dp_sgd": "noise=1.1,clip=0.5",
    "dp_fedavg": "noise=1.1,clip=0.5",
    "max_epsilon": "8.0",
    "dp_delta": "1e-05",
}
# What a command needs besides the setting under test (node: an id and data).
REQUIRED = {"node": {"node_id": "n0", "demo_shard": "1/1"}}
# ... and besides a setting that needs another (--buffer is for --mode async).
NEEDS = {
    "buffer": {"mode": "async"},
    "site": {"upstream": "127.0.0.1:1884"},  # a site aggregator sends to the root's broker
    "upstream": {"site": "north"},
}


def sample(item: settings.Declared) -> str:
    if item.setting.switch:
        return "true"
    return SAMPLES.get(item.name) or item.setting.show(item.default)


def cases() -> list[tuple[str, str]]:
    parser = cli.build_parser()
    return [(c, name) for c in config.COMMANDS for name in parser.commands[c].settings]


def parse(argv: list[str], env: dict[str, str] | None = None):
    return config.parse_args(cli.build_parser(), argv, env or {})


@pytest.mark.parametrize(("command", "name"), cases())
def test_every_setting_is_an_option_a_toml_key_and_a_variable(command, name, tmp_path):
    item = cli.build_parser().commands[command].settings[name]
    text = sample(item)
    others = {
        key: value
        for key, value in {**REQUIRED.get(command, {}), **NEEDS.get(name, {})}.items()
        if key != name and (item.setting.exclusive is None or key not in _group_of(command, item))
    }
    base = [command] + [
        a for key, value in others.items() for a in (f"--{key.replace('_', '-')}", value)
    ]

    given = [item.flag] if item.setting.switch else [item.flag, text]
    from_cli = getattr(parse(base + given), name)

    env = {item.env: text}
    assert item.env == f"FEDMQ_{item.section}_{name}".upper()
    assert getattr(parse(base, env), name) == from_cli

    value = "true" if item.setting.switch else f'"{text}"'
    path = tmp_path / "f.toml"
    path.write_text(f"[{item.section}]\n{name} = {value}\n")
    from_file = getattr(parse([*base, "--config", str(path)]), name)
    if item.is_path or (item.setting.keywords and text not in item.setting.keywords):
        assert Path(from_file) == tmp_path / text  # relative to the file's folder
    else:
        assert from_file == from_cli


def _group_of(command: str, item: settings.Declared) -> set[str]:
    found = cli.build_parser().commands[command].settings
    return {k for k, other in found.items() if other.setting.exclusive == item.setting.exclusive}


@pytest.mark.parametrize("command", config.COMMANDS)
def test_a_typo_in_any_section_is_one_line_naming_it(command, tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(f"[{command}]\nbach_size = 3\n")
    with pytest.raises(config.ConfigError) as caught:
        parse([command, "--config", str(path)])
    assert str(caught.value) == f"config {path}: unknown key {command}.bach_size"


def test_every_field_of_the_settings_classes_is_declared():
    for cls in cli.SETTINGS.values():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(settings.declared(cls)) == names, cls


def test_a_settings_object_survives_its_command_line():
    """``to_argv`` then the aggregator's parser gives the same object back."""
    chosen = AggregatorSettings(
        broker=BrokerAddress("hub", 8883),
        federation="lab",
        username="agg",
        tls_ca=Path("ca.crt"),
        log_json=True,
        log_level="debug",
        model="mlp:64-16-10",
        nodes=4,
        min_nodes=3,
        round_timeout=None,
        rounds=7,
        learning_rate=0.05,
        batch_size=8,
        local_epochs=2,
        seed=-3,
        compression="topk:0.1+ef",
        test_data=None,
        max_update_bytes=99999,
        report=Path("r.json"),
        state_dir=Path("st"),
        rollback_to=3,
        node_ids=("a", "b"),
        sample_fraction=0.5,
        aggregation="median",
        clip_norm=2.5,
    )
    argv = ["aggregator", *settings.to_argv(chosen)]
    assert settings.build(AggregatorSettings, parse(argv)) == chosen
    node = NodeSettings(
        node_id="n", demo_shard=(1, 3), partition="dirichlet:0.5", exit_when_done=True
    )
    back = settings.build(NodeSettings, parse(["node", *settings.to_argv(node)]))
    assert back == node


def test_the_demo_starts_its_children_with_their_settings(tmp_path):
    demo = DemoSettings(nodes=2, rounds=3, seed=5, compression="int8", round_timeout=9.5)
    address = BrokerAddress("127.0.0.1", 41883)
    paths = [tmp_path / "n1.npz", tmp_path / "n2.npz"]
    argv = child_argv(demo, address, tmp_path, tmp_path / "test.npz", paths)
    assert list(argv) == ["aggregator", "node-01", "node-02"]
    aggregator = settings.build(AggregatorSettings, parse(argv["aggregator"]))
    assert aggregator == AggregatorSettings(
        broker=address,
        federation="demo",
        task="digits-mlp",
        nodes=2,
        rounds=3,
        seed=5,
        compression="int8",
        round_timeout=9.5,
        test_data=str(tmp_path / "test.npz"),
        state_dir=tmp_path / "aggregator",
        log_json=True,
    )
    node = settings.build(NodeSettings, parse(argv["node-02"]))
    assert node == NodeSettings(
        broker=address,
        federation="demo",
        node_id="node-02",
        task="digits-mlp",
        data=paths[1],
        state_dir=tmp_path / "node-02",
        exit_when_done=True,
        log_json=True,
    )
    default = child_argv(DemoSettings(), address, tmp_path, tmp_path / "t.npz", [])
    assert settings.build(AggregatorSettings, parse(default["aggregator"])).round_timeout == 300


def test_the_fingerprint_is_the_kept_settings_stored_as_before():
    chosen = AggregatorSettings(
        federation="lab", test_data=None, learning_rate=0.2, seed=4, eval_fraction=0.0
    )
    aggregator = build_aggregator(chosen, lambda *_: None)
    expected = {
        "federation": "lab",
        "model": "digits-mlp",
        "plan": [0.2, 16, 1, 4],
        "compression": "dense",
    }
    fingerprint = aggregator.settings.fingerprint
    assert fingerprint == run_fingerprint(kept_values(chosen)) == expected
    # byte for byte what checkpoint.msgpack held: an existing state dir resumes
    assert msgpack.packb(fingerprint) == msgpack.packb(expected)
    kept = [
        name
        for name, item in settings.declared(AggregatorSettings).items()
        if item.setting.kept is not None
    ]
    assert kept == [
        "federation",
        "task",  # kept under "model", as before --task
        "mode",  # only when async, as eval_fraction only when not 0
        "learning_rate",
        "batch_size",
        "local_epochs",
        "seed",
        "compression",
        "eval_fraction",
        "proximal_mu",
        "dp_fedavg",  # only when given, as eval_fraction only when not 0
        "dp_sgd",  # only when given, as eval_fraction only when not 0
        "server_optimizer",  # only when not fedavg, as eval_fraction only when not 0
    ]


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"learning_rate": 0.3}, "--learning-rate"),
        ({"batch_size": 32}, "--batch-size"),
        ({"local_epochs": 2}, "--local-epochs"),
        ({"seed": 1}, "--seed"),
        ({"task": "mlp:64-8-10"}, "--task"),
        ({"compression": "fp16"}, "--compression"),
        ({"federation": "other"}, "--federation"),
        ({"proximal_mu": 0.01}, "--proximal-mu"),
        ({"dp_sgd": "noise=1.0,clip=1.0"}, "--dp-sgd"),
        ({"dp_fedavg": "noise=1.0,clip=1.0"}, "--dp-fedavg"),
        ({"mode": "async"}, "--mode"),
    ],
)
def test_a_changed_kept_setting_is_named_by_its_option(change, option):
    before = AggregatorSettings(test_data=None)
    after = dataclasses.replace(before, **change)
    saved = run_fingerprint(kept_values(before))
    ((name, value),) = change.items()
    changed = fingerprint_mismatch(saved, run_fingerprint(kept_values(after)))
    assert changed == (option, kept_values(before)[name], value)
    unkept = dataclasses.replace(before, rounds=99, aggregation="median", nodes=3)
    assert fingerprint_mismatch(saved, run_fingerprint(kept_values(unkept))) is None
    old_spelling = dataclasses.replace(before, model="mlp:64-8-10")
    assert fingerprint_mismatch(saved, run_fingerprint(kept_values(old_spelling))) == (
        "--task",
        "digits-mlp",
        "mlp:64-8-10",
    )


def kept_values(chosen: AggregatorSettings) -> dict:
    """The settings' values as the aggregator fingerprints them: the task as resolved."""
    return {**dataclasses.asdict(chosen), "task": chosen.task_spec}


def test_dispatch_passes_the_settings_object_to_the_role(monkeypatch, tmp_path):
    import fedmq.aggregator.app

    seen = []
    monkeypatch.setattr(fedmq.aggregator.app, "run", lambda chosen, _stop: seen.append(chosen) or 0)
    monkeypatch.setattr(cli.logs, "configure", lambda **_: None)
    monkeypatch.setattr(cli, "_stop_on_signals", threading.Event)
    monkeypatch.delenv("FEDMQ_CONFIG", raising=False)
    argv = ["aggregator", "--rounds", "4", "--state-dir", str(tmp_path), "--username", "agg"]
    assert cli.main(argv) == 0
    (chosen,) = seen
    assert isinstance(chosen, AggregatorSettings)
    assert (chosen.rounds, chosen.state_dir) == (4, tmp_path)
    assert chosen.broker.credentials.username == "agg"  # credentials folded into broker


def test_written_out_defaults_agree_with_the_round_logic():
    from fedmq.aggregator.robust import DEFAULT
    from fedmq.aggregator.rounds import DEFAULT_DEADLINE_SECONDS

    assert AggregatorSettings().aggregation == str(DEFAULT)
    assert AggregatorSettings().round_timeout == DEFAULT_DEADLINE_SECONDS


def test_help_reads_the_settings_without_numpy():
    import subprocess
    import sys

    code = "import sys\nfrom fedmq import cli\ncli.build_parser()\nprint('numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_a_restart_with_another_kept_setting_is_refused_naming_its_option(tmp_path):
    from fedmq.aggregator.app import resume_or_start
    from fedmq.aggregator.checkpoint import CheckpointError, StateDir

    first = AggregatorSettings(test_data=None, learning_rate=0.1)
    store = StateDir(tmp_path)
    build_aggregator(first, lambda *_: None, store).start()
    store.close()
    again = build_aggregator(dataclasses.replace(first, learning_rate=0.3), lambda *_: None)
    with pytest.raises(CheckpointError) as refused:
        resume_or_start(again, StateDir(tmp_path))
    assert str(refused.value).startswith(
        f"--learning-rate 0.3 does not match the run kept in {tmp_path}, which uses "
        "--learning-rate 0.1: start with --learning-rate 0.1 to continue it"
    )


def test_the_demo_waits_for_its_first_round_as_long_as_start_timeout_says():
    """A big model on slow machines compiles longer than 120 s before round 1 closes."""
    chosen = settings.build(DemoSettings, parse(["demo", "--start-timeout", "600"]))
    assert chosen.first_round_timeout == 600.0
    assert settings.build(DemoSettings, parse(["demo"])).first_round_timeout == 120.0
