"""The systemd units in deploy/systemd/ and what they refer to.

``systemd-analyze verify`` checks a unit's syntax, its directives and that the program
of ExecStart= exists and is executable. The node and aggregator units start
/opt/fedmq/.venv/bin/fedmq, the path docs/deploy-raspberry-pi.md installs to, which a
CI machine or a developer's checkout does not have; the broker's /usr/sbin/mosquitto
may be missing too. So each unit is verified as a copy in a temporary directory whose
ExecStart= program is swapped for one that exists here (this repository's
.venv/bin/fedmq, or /bin/true): everything else in the unit is verified as shipped,
and a separate test checks the real ExecStart= lines word by word. Without
systemd-analyze (not a systemd system) the verification is skipped with that reason.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedmq import cli, config

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
EXAMPLES = ROOT / "deploy" / "config"
NAMES = ("fedmq-node.service", "fedmq-aggregator.service", "fedmq-broker.service")
VENV_FEDMQ = "/opt/fedmq/.venv/bin/fedmq"


def directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_every_unit_is_there():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_units_verify(name, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (not a systemd system): units not verified")
    here = Path(sys.executable).parent / "fedmq"
    stand_in = str(here) if here.exists() else "/bin/true"
    text = (UNITS / name).read_text()
    text = text.replace(VENV_FEDMQ, stand_in).replace("/usr/sbin/mosquitto", "/bin/true")
    copy = tmp_path / name
    copy.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    # Only complaints about this unit count: on a container without a running systemd,
    # verify also reports on the host's own units (e.g. missing targets of theirs).
    ours = [line for line in done.stderr.splitlines() if name in line]
    assert not ours, "\n".join(ours)
    assert done.returncode == 0 or not done.stderr.strip(), done.stderr


@pytest.mark.parametrize(
    ("name", "command", "example"),
    [
        ("fedmq-node.service", "node", "node.toml"),
        ("fedmq-aggregator.service", "aggregator", "aggregator.toml"),
    ],
)
def test_fedmq_units_start_the_command_with_the_shipped_config(name, command, example):
    unit = directives(UNITS / name)
    [exec_start] = unit["ExecStart"]
    config_path = f"/etc/fedmq/{example}"
    assert exec_start.split() == [VENV_FEDMQ, command, "--config", config_path]
    assert (EXAMPLES / example).is_file(), f"{name} refers to {config_path}: ship {example}"
    # the state directory systemd creates is the one the example config writes to
    [state] = unit["StateDirectory"]
    args = config.parse_args(cli.build_parser(), [command, "--config", str(EXAMPLES / example)], {})
    assert args.state_dir == Path("/var/lib") / state
    assert unit["ReadWritePaths"] == [f"/var/lib/{state}"]


def test_broker_unit_runs_mosquitto_with_the_deployment_config():
    unit = directives(UNITS / "fedmq-broker.service")
    assert unit["ExecStart"] == ["/usr/sbin/mosquitto -c /etc/fedmq/mosquitto.conf"]
    # mosquitto.conf keeps its database where the unit lets it write
    conf = (ROOT / "mosquitto.conf").read_text()
    [location] = re.findall(r"^persistence_location (\S+)$", conf, re.MULTILINE)
    assert unit["ReadWritePaths"] == [location.rstrip("/")]


def test_broker_unit_gives_mosquitto_its_files_before_start_and_reload():
    # mosquitto reads the password and ACL files as the user mosquitto; init, add-node and
    # revoke-node write them for root, and a reload that cannot read them refuses everyone
    unit = directives(UNITS / "fedmq-broker.service")
    chown = "-+/bin/chown -R mosquitto: /etc/fedmq/broker"
    assert unit["ExecStartPre"] == [chown]
    assert unit["ExecReload"] == [chown, "/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize("name", NAMES)
def test_units_restart_on_failure_after_the_network(name):
    unit = directives(UNITS / name)
    assert unit["Restart"] == ["on-failure"]
    assert "network-online.target" in unit["Wants"][0].split()
    assert "network-online.target" in unit["After"][0].split()
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]


@pytest.mark.parametrize("name", ["fedmq-node.service", "fedmq-aggregator.service"])
def test_jax_units_leave_writable_executable_memory_alone(name):
    # XLA emits machine code into memory it then executes: MemoryDenyWriteExecute kills it
    assert "MemoryDenyWriteExecute" not in directives(UNITS / name)


def test_the_deploy_guide_names_every_unit_and_example():
    guide = (ROOT / "docs" / "deploy-raspberry-pi.md").read_text()
    for name in (*NAMES, "node.toml", "aggregator.toml", "broker.toml"):
        assert name in guide, name


@pytest.mark.parametrize(
    ("row", "command", "section"),
    [
        ("`[connection]`", "node", "connection"),
        ("`[node]`", "node", "node"),
        ("`[aggregator]`", "aggregator", "aggregator"),
        ("`[broker]`", "broker", "broker"),
    ],
)
def test_the_guides_key_table_is_complete(row, command, section):
    guide = (ROOT / "docs" / "deploy-raspberry-pi.md").read_text()
    [line] = [line for line in guide.splitlines() if line.startswith(f"| {row}")]
    listed = set(re.findall(r"`([a-z_]+)`", line.split("|")[2]))
    assert listed == set(config.section_keys(cli.build_parser(), command)[section])


# --- the guide's commands agree with the example configs and with each other ----------

GUIDE = ROOT / "docs" / "deploy-raspberry-pi.md"


def guide_blocks(language: str) -> list[str]:
    """The guide's fenced code blocks of one language (sh, toml)."""
    return re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(), re.MULTILINE | re.DOTALL)


def shell_commands(text: str) -> list[str]:
    """Commands of sh blocks, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]


def guide_commands() -> list[str]:
    return [command for block in guide_blocks("sh") for command in shell_commands(block)]


def example(name: str, command: str) -> Any:
    return config.parse_args(cli.build_parser(), [command, "--config", str(EXAMPLES / name)], {})


def test_the_node_example_reaches_the_host_the_brokers_certificate_names():
    # The node checks the broker's certificate against the host name it connects to, so
    # node.toml, the guide's node config and `broker init --hostname` must agree.
    [init] = [c for c in guide_commands() if "fedmq broker init" in c]
    hostnames = re.findall(r"--hostname (\S+)", init)
    node_host = example("node.toml", "node").broker.host
    assert node_host in hostnames, (node_host, hostnames)
    assert hostnames[0] == node_host, "the bundles' broker = is the first --hostname"
    guide_brokers = re.findall(r'^broker = "([^":]+):8883"', "\n".join(guide_blocks("toml")), re.M)
    assert guide_brokers and set(guide_brokers) == {node_host}


def test_the_aggregator_example_sets_a_deadline_and_a_quorum():
    # set in the file, not left to the defaults: the example shows a fleet's choice
    with (EXAMPLES / "aggregator.toml").open("rb") as file:
        written = tomllib.load(file)["aggregator"]
    assert {"round_timeout", "min_nodes"} <= written.keys()
    args = example("aggregator.toml", "aggregator")
    assert args.round_timeout == written["round_timeout"] > 0
    assert 1 <= args.min_nodes == written["min_nodes"] < args.nodes


def test_the_guide_configures_the_aggregator_with_a_deadline_and_a_quorum():
    tables = [tomllib.loads(block) for block in guide_blocks("toml")]
    [aggregator] = [t["aggregator"] for t in tables if "aggregator" in t]
    assert aggregator["round_timeout"] > 0
    assert 1 <= aggregator["min_nodes"] < aggregator["nodes"]


def test_the_guides_offline_download_gets_jaxlib_0_10_2():
    # From jaxlib 0.7.2 on the aarch64 wheels are tagged manylinux_2_27 only: with
    # manylinux2014_aarch64 alone pip silently falls back to jax/jaxlib 0.7.1.
    [download] = [c for c in guide_commands() if " pip download " in f" {c}"]
    platforms = re.findall(r"--platform (\S+)", download)
    assert "manylinux_2_27_aarch64" in platforms
    assert {"manylinux2014_aarch64", "manylinux_2_17_aarch64"} <= set(platforms)
    assert "--python-version 3.11" in download and "--only-binary=:all:" in download
    # scripts/check-arm64 installs what this line downloads
    script = (ROOT / "scripts" / "check-arm64").read_text()
    [listed] = re.findall(r"^platforms=\((.*)\)$", script, re.MULTILINE)
    assert listed.split() == platforms


def test_the_guide_installs_no_compiler():
    # python3-pip recommends build-essential and python3-dev (gcc and ~170 packages);
    # the venv's own pip is all the guide needs.
    installs = [c for c in guide_commands() if "apt-get install" in c]
    assert installs
    for command in installs:
        packages = set(command.split())
        assert not packages & {"python3-pip", "build-essential", "gcc", "python3-dev"}, command


def test_the_guide_gives_mosquitto_its_files():
    # mosquitto runs as the user `mosquitto` and re-reads the password and ACL files as
    # that user on every reload: the guide says how, not where to look it up.
    commands = guide_commands()
    assert any(re.search(r"chown -R mosquitto: /etc/fedmq/broker\b", c) for c in commands)
    assert any("chmod 0644 /etc/fedmq/ca/ca.crt" in c for c in commands)


def test_check_arm64_answers_help_and_refuses_a_bad_argument_in_one_line():
    script = ROOT / "scripts" / "check-arm64"
    helped = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--cache DIR" in helped.stdout
    bad = subprocess.run([script, "--rounds", "x"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["check-arm64: error: --rounds needs a whole number >= 1"]
