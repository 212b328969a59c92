"""Settings from TOML files and FEDMQ_<SECTION>_<KEY> variables (fedmq.config): the
precedence, every error's one-line shape, relative paths, and the shipped examples in
deploy/config/ (they parse, set what they say, and their commented defaults are the
real defaults)."""

import argparse
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedmq import cli, config
from fedmq.mqtt import BrokerAddress

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "config"


def parse(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    return config.parse_args(cli.build_parser(), argv, env or {})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(config.ConfigError) as caught:
        parse(argv, env)
    message = str(caught.value)
    assert "\n" not in message
    return message


NODE = """
[connection]
broker = "hub.example:8883"
federation = "lab"

[node]
node_id = "pi-01"
data = "data.npz"
state_dir = "state"
"""


# ---- precedence: command line > environment > file > default ----------------------------


def test_file_sets_what_the_command_line_left_out(tmp_path):
    path = write(tmp_path / "node.toml", NODE)
    args = parse(["node", "--config", str(path)])
    assert args.broker == BrokerAddress("hub.example", 8883)
    assert args.federation == "lab"
    assert args.node_id == "pi-01"
    assert args.partition == "iid"  # not in the file: the built-in default
    assert args.config == path


def test_environment_beats_file_and_command_line_beats_both(tmp_path):
    path = write(tmp_path / "node.toml", NODE)
    env = {"FEDMQ_NODE_NODE_ID": "from-env", "FEDMQ_CONNECTION_FEDERATION": "env-fed"}
    args = parse(["node", "--config", str(path), "--federation", "cli-fed"], env)
    assert args.node_id == "from-env"
    assert args.federation == "cli-fed"
    assert args.broker.host == "hub.example"


def test_an_option_given_its_default_value_still_wins(tmp_path):
    path = write(tmp_path / "a.toml", "[aggregator]\nbatch_size = 32\n")
    assert parse(["aggregator", "--config", str(path)]).batch_size == 32
    assert parse(["aggregator", "--config", str(path), "--batch-size", "16"]).batch_size == 16


def test_config_path_from_the_environment(tmp_path):
    path = write(tmp_path / "node.toml", NODE)
    args = parse(["node"], {"FEDMQ_CONFIG": str(path)})
    assert args.node_id == "pi-01"
    other = write(tmp_path / "other.toml", NODE.replace("pi-01", "pi-02"))
    assert parse(["node", "--config", str(other)], {"FEDMQ_CONFIG": str(path)}).node_id == "pi-02"


def test_flags_from_file_and_environment(tmp_path):
    path = write(tmp_path / "a.toml", "[aggregator]\nfresh = true\nlog_json = false\n")
    args = parse(["aggregator", "--config", str(path)])
    assert args.fresh is True and args.log_json is False
    assert (
        parse(["aggregator", "--config", str(path)], {"FEDMQ_AGGREGATOR_FRESH": "no"}).fresh
        is False
    )
    assert parse(["aggregator"], {"FEDMQ_AGGREGATOR_FRESH": "1"}).fresh is True


def test_node_ids_as_a_toml_array_or_text(tmp_path):
    path = write(tmp_path / "a.toml", '[aggregator]\nnode_ids = ["pi-02", "pi-01"]\n')
    assert parse(["aggregator", "--config", str(path)]).node_ids == ("pi-01", "pi-02")
    path = write(tmp_path / "b.toml", '[aggregator]\nnode_ids = "pi-02,pi-01"\n')
    assert parse(["aggregator", "--config", str(path)]).node_ids == ("pi-01", "pi-02")


def test_mutually_exclusive_options_take_the_highest_layer(tmp_path):
    path = write(tmp_path / "node.toml", NODE)
    args = parse(["node", "--config", str(path), "--demo-shard", "2/3"])
    assert args.demo_shard == (1, 3) and args.data is None
    args = parse(["node", "--config", str(path)], {"FEDMQ_NODE_DEMO_SHARD": "1/3"})
    assert args.demo_shard == (0, 3) and args.data is None


def test_without_config_the_command_line_alone_works():
    args = parse(["node", "--node-id", "n1", "--demo-shard", "1/2"])
    assert args.node_id == "n1" and args.config is None
    assert args.state_dir is None  # the node's default: .fedmq-node/<federation>/<node id>


def test_demo_takes_no_config_and_ignores_the_variable(tmp_path):
    args = parse(["demo", "--nodes", "2"], {"FEDMQ_CONFIG": str(tmp_path / "absent.toml")})
    assert args.nodes == 2 and not hasattr(args, "config")


def test_a_file_for_several_roles_serves_each(tmp_path):
    path = write(
        tmp_path / "all.toml",
        NODE + "\n[aggregator]\nrounds = 5\n\n[broker]\nport = 1999\n\n[monitor]\njson = true\n",
    )
    assert parse(["aggregator", "--config", str(path)]).rounds == 5
    assert parse(["aggregator", "--config", str(path)]).federation == "lab"
    assert parse(["broker", "--config", str(path)]).port == 1999
    assert parse(["monitor", "--config", str(path)]).json is True
    assert parse(["node", "--config", str(path)]).node_id == "pi-01"


# ---- relative paths ------------------------------------------------------------------


def test_relative_paths_in_a_file_resolve_against_its_directory(tmp_path, monkeypatch):
    bundle = tmp_path / "etc" / "fedmq"
    bundle.mkdir(parents=True)
    text = NODE.replace('federation = "lab"', 'federation = "lab"\ntls_ca = "ca.crt"')
    text += '\n[aggregator]\ntest_data = "test.npz"\nreport = "/abs/r.json"\n'
    write(bundle / "node.toml", text)
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    args = parse(["node", "--config", "etc/fedmq/node.toml"])
    assert args.data == bundle / "data.npz"
    assert args.state_dir == bundle / "state"
    assert args.tls_ca == bundle / "ca.crt"
    agg = parse(["aggregator", "--config", "etc/fedmq/node.toml"])
    assert agg.test_data == str(bundle / "test.npz")
    assert agg.report == Path("/abs/r.json")


def test_keywords_are_not_paths(tmp_path):
    path = write(tmp_path / "a.toml", '[aggregator]\ntest_data = "none"\n')
    assert parse(["aggregator", "--config", str(path)]).test_data is None


def test_relative_paths_from_environment_and_command_line_stay_relative(tmp_path):
    path = write(tmp_path / "node.toml", NODE)
    env = {"FEDMQ_NODE_STATE_DIR": "here"}
    assert parse(["node", "--config", str(path)], env).state_dir == Path("here")
    assert parse(["node", "--config", str(path), "--data", "d.npz"]).data == Path("d.npz")


# ---- every error is one line that names the key -----------------------------------------

FILE_ERRORS = [
    ("[aggregator]\nbatch_size = 0\n", "aggregator.batch_size: '0' is not a whole number >= 1"),
    (
        "[aggregator]\nbatch_size = 16.5\n",
        "aggregator.batch_size: '16.5' is not a whole number >= 1",
    ),
    ("[aggregator]\nbach_size = 3\n", "unknown key aggregator.bach_size"),
    (
        "[aggregator]\nsample_fraction = 1.5\n",
        "aggregator.sample_fraction: '1.5' is not a fraction in (0, 1]",
    ),
    ('[aggregator]\nfresh = "yes"\n', "aggregator.fresh: 'yes' is not true or false"),
    (
        '[aggregator]\nlog_level = "loud"\n',
        "aggregator.log_level: 'loud' is not one of debug, info, warning, error",
    ),
    ('[aggregator]\ncompression = "topk:2"\n', "aggregator.compression: "),
    ("[node]\nnode_id = 3\n", "node.node_id: 3 is not a string (quote it)"),
    ("[aggregator]\nmodel = 3\n", "aggregator.model: unknown model '3'"),
    ("[aggregator]\nrounds = true\n", "aggregator.rounds: true is not a number"),
    (
        "[aggregator]\ncompression = 1979-05-27\n",
        "aggregator.compression: 1979-05-27 is not a string",
    ),
    ("[aggregator]\nmin_nodes = [3]\n", "aggregator.min_nodes: [3] is not a number or a string"),
    ("[aggregator]\nnode_ids = [1, 2]\n", "aggregator.node_ids: [1, 2] is not a list of strings"),
    ('[aggregator]\nnode_ids = "a/b"\n', "aggregator.node_ids: "),
    (
        '[aggregator]\nfederation = "x"\n',
        "unknown key aggregator.federation (it belongs in [connection])",
    ),
    ("[aggregator.extra]\nx = 1\n", "unknown key aggregator.extra"),
    ("[aggregator.rounds]\nx = 1\n", "aggregator.rounds: is a table, expected a value"),
    (
        '[connection]\nbroker = "hub:http"\n',
        "connection.broker: broker address 'hub:http' is not HOST:PORT",
    ),
    ('[connection]\nnode_id = "x"\n', "unknown key connection.node_id"),
    (
        '[node]\nnode_id = "x"\ndata = "a.npz"\ndemo_shard = "1/2"\n',
        "node.data and node.demo_shard cannot both be set",
    ),
    (
        '[node]\ndemo_shard = "3/2"\n',
        "node.demo_shard: '3/2' is not INDEX/COUNT with 1 <= INDEX <= COUNT",
    ),
    (
        '[broker]\nport = "x"\n',
        "broker.port: 'x' is not a port number (0-65535, 0 = any free port)",
    ),
    (
        '[nod]\nnode_id = "x"\n',
        "unknown section [nod] (known: [connection], [node], [aggregator], [broker], [monitor])",
    ),
    ('node_id = "x"\n', "unknown key node_id (keys belong in a section)"),
    ("connection = 3\n", "connection is a value, expected a section [connection]"),
    (
        "[node\n",
        "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 6)",
    ),
    ("[node]\nnode_id = \n", "not valid TOML: "),
]


@pytest.mark.parametrize(("text", "expected"), FILE_ERRORS)
def test_file_errors_name_the_file_and_key(tmp_path, text, expected):
    path = write(tmp_path / "bad.toml", text)
    message = error_of(["node", "--config", str(path)])
    assert message.startswith(f"config {path}: {expected}")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"FEDMQ_AGGREGATOR_BATCH_SIZE": "0"},
            "environment FEDMQ_AGGREGATOR_BATCH_SIZE: aggregator.batch_size: '0' is not a whole number >= 1",
        ),
        (
            {"FEDMQ_AGGREGATOR_BACH_SIZE": "3"},
            "environment FEDMQ_AGGREGATOR_BACH_SIZE: unknown key aggregator.bach_size",
        ),
        (
            {"FEDMQ_AGGREGATOR_FRESH": "maybe"},
            "environment FEDMQ_AGGREGATOR_FRESH: aggregator.fresh: 'maybe' is not true or false",
        ),
        (
            {"FEDMQ_CONNECTION_BROKER": ":1"},
            "environment FEDMQ_CONNECTION_BROKER: connection.broker: broker address ':1' is not HOST:PORT",
        ),
        (
            {"FEDMQ_CONFIG": "/nonexistent/fedmq.toml"},
            "config /nonexistent/fedmq.toml: cannot read: No such file or directory",
        ),
    ],
)
def test_environment_errors_name_the_variable(env, expected):
    assert error_of(["aggregator"], env) == expected


def test_other_roles_variables_are_left_alone():
    # the node does not read [aggregator]: a shared environment may hold its settings
    args = parse(["node", "--node-id", "n", "--demo-shard", "1/1"], {"FEDMQ_AGGREGATOR_BACH": "x"})
    assert args.node_id == "n"


def test_missing_required_settings_say_where_to_give_them():
    assert error_of(["node", "--demo-shard", "1/2"]) == (
        "node.node_id is not set: give --node-id, FEDMQ_NODE_NODE_ID or node_id in [node] "
        "of the --config file"
    )
    assert error_of(["node", "--node-id", "n"]) == (
        "one of node.data, node.demo_shard must be set: give --data or --demo-shard, "
        "FEDMQ_NODE_DATA or FEDMQ_NODE_DEMO_SHARD, or one of them in [node] of the --config file"
    )


def test_both_exclusive_options_in_the_environment():
    env = {"FEDMQ_NODE_DATA": "a.npz", "FEDMQ_NODE_DEMO_SHARD": "1/2"}
    assert error_of(["node", "--node-id", "n"], env) == (
        "environment: FEDMQ_NODE_DATA and FEDMQ_NODE_DEMO_SHARD cannot both be set"
    )


def test_the_command_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path / "node.toml", "[node]\nbach_size = 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "fedmq", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr == f"fedmq node: error: config {path}: unknown key node.bach_size\n"


def test_command_line_usage_errors_stay_argparse_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse(["aggregator", "--batch-size", "0"])
    assert stopped.value.code == 2
    assert "argument --batch-size: '0' is not a whole number >= 1" in capsys.readouterr().err


# ---- the shipped examples ----------------------------------------------------------------

ROLE_OF = {"node.toml": "node", "aggregator.toml": "aggregator", "broker.toml": "broker"}
SETTING = re.compile(r"^(#\s*)?([a-z_]+)\s*=\s*(.+?)\s*$")


def settings_in(path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(set, commented) settings: {section: {key: TOML value text}} each; a commented
    setting is a line ``# key = value`` with a TOML value (prose comments are skipped)."""
    active: dict[str, dict[str, str]] = {}
    commented: dict[str, dict[str, str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        header = re.match(r"^#?\s*\[([a-z]+)\]\s*$", line)
        if header:
            section = header.group(1)
            continue
        match = SETTING.match(line)
        if not match:
            continue
        value = match.group(3)
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            continue  # prose that happens to contain " = "
        (commented if match.group(1) else active).setdefault(section, {})[match.group(2)] = value
    return active, commented


@pytest.mark.parametrize("name", sorted(ROLE_OF))
def test_example_sets_what_it_says(name):
    path = EXAMPLES / name
    role = ROLE_OF[name]
    args = parse([role, "--config", str(path)])
    active, _ = settings_in(path)
    assert active, f"{name}: no settings found"
    file = config.read_file(cli.build_parser(), path)
    for section, keys in active.items():
        for key in keys:
            if section in (config.CONNECTION, role):
                assert getattr(args, key) == file[section][key], f"{name}: {section}.{key}"


@pytest.mark.parametrize("name", sorted(ROLE_OF))
def test_example_documents_every_key_with_its_default(name, tmp_path):
    """Every option of the role is in the example, set or commented; a commented
    ``# key = value`` is valid and, where the option has a default, is that default."""
    path = EXAMPLES / name
    role = ROLE_OF[name]
    parser = cli.build_parser()
    keys = config.section_keys(parser, role)
    active, commented = settings_in(path)
    for section, allowed in keys.items():
        documented = set(active.get(section, {})) | set(commented.get(section, {}))
        missing = sorted(set(allowed) - documented)
        assert not missing, f"{name}: document {missing} in [{section}]"
        for key, value in commented.get(section, {}).items():
            one = write(tmp_path / "one.toml", f"[{section}]\n{key} = {value}\n")
            got = config.read_file(parser, one)[section][key]
            default = allowed[key].default
            if default is not None and not isinstance(default, Path):
                assert got == default, (
                    f"{name}: commented {section}.{key} = {value} is not the default {default!r}"
                )


def test_examples_with_every_commented_setting_switched_on_still_parse(tmp_path):
    for name, role in ROLE_OF.items():
        lines = []
        for line in (EXAMPLES / name).read_text().splitlines():
            match = SETTING.match(line)
            if match and match.group(1) and match.group(2) != "demo_shard":
                try:
                    tomllib.loads(f"v = {match.group(3)}")
                    line = line.lstrip("#").lstrip()
                except tomllib.TOMLDecodeError:
                    pass
            lines.append(line)
        path = write(tmp_path / name, "\n".join(lines) + "\n")
        config.read_file(cli.build_parser(), path)
        assert role in tomllib.loads(path.read_text())


def test_the_demo_children_do_not_inherit_a_deployments_settings(monkeypatch, tmp_path):
    import threading

    import fedmq.demo

    seen: dict[str, str] = {}

    def fake_run(_config: object, _stop: object) -> int:
        # what Children._popen gives each child it starts
        children_get = fedmq.demo.child_environment(os.environ)
        seen.update({k: v for k, v in children_get.items() if k.startswith("FEDMQ_")})
        return 0

    monkeypatch.setenv("FEDMQ_CONFIG", str(write(tmp_path / "node.toml", NODE)))
    monkeypatch.setenv("FEDMQ_CONNECTION_BROKER", "elsewhere:8883")
    monkeypatch.setattr(fedmq.demo, "run", fake_run)
    monkeypatch.setattr(cli.logs, "configure", lambda **_: None)  # no global logging set-up
    monkeypatch.setattr(cli, "_stop_on_signals", threading.Event)
    assert cli.main(["demo", "--nodes", "1", "--rounds", "1"]) == 0
    assert seen == {}


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[node]\nnode_id = "caf\xe9"\n'.encode("latin-1"))
    assert error_of(["node", "--config", str(path)]) == (
        f"config {path}: not valid TOML: not UTF-8 (invalid continuation byte)"
    )


def test_a_directory_given_as_config(tmp_path):
    message = error_of(["node", "--config", str(tmp_path)])
    assert message == f"config {tmp_path}: cannot read: Is a directory"
