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
from pathlib import Path

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
