"""What users install: a wheel built from this tree, in a fresh virtual environment.

The repository keeps the roles in top-level folders; the wheel must hold them as
subpackages of fedmq, with every data file a command reads at run time, and claim no
other top-level import name. The commands are run from a directory outside the
repository, so nothing can be found relative to the source tree.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker.process import free_port

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> where its files live in the wheel (pyproject.toml, package-dir).
PACKAGE_DIRS = {
    "src/fedmq": "fedmq",
    "broker": "fedmq/broker",
    "node": "fedmq/node",
    "aggregator": "fedmq/aggregator",
    "schemas": "fedmq/schemas",
}
NOT_SHIPPED = {"__pycache__"}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGE_DIRS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listed.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel` of a copy of the working tree (a stale build/ in the checkout cannot
    leak files into it), as docs/deploy-raspberry-pi.md builds it."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(source)],
        check=True,
        capture_output=True,
    )
    [built] = work.glob("fedmq-*.whl")
    return built


def test_wheel_holds_every_package_and_data_file_of_the_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        top = archive.read(top_level).decode().split()
    expected = set()
    for path in tracked_files():
        folder = next(f for f in PACKAGE_DIRS if path.startswith(f"{f}/"))
        relative = path[len(folder) + 1 :]
        if NOT_SHIPPED.isdisjoint(Path(relative).parts):
            expected.add(f"{PACKAGE_DIRS[folder]}/{relative}")
    assert "fedmq/broker/mosquitto.conf" in expected  # the data file commands need
    assert "fedmq/compression/spec.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert top == ["fedmq"], f"the wheel claims top-level import names {top}"
    with zipfile.ZipFile(wheel) as archive:
        shipped_conf = archive.read("fedmq/broker/mosquitto.conf")
    assert shipped_conf == (ROOT / "mosquitto.conf").read_bytes()


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel and its demo extra; its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[demo]"],
        check=True,
        capture_output=True,
    )
    return venv / "bin"


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A working directory outside the repository, with an environment that does not
    point back into it."""
    assert ROOT not in tmp_path.parents
    yield tmp_path


def run(bin_dir: Path, cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "FEDMQ_CONFIG"}}
    return subprocess.run(
        [str(bin_dir / "fedmq"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_installed_wheel_claims_no_top_level_role_names(installed: Path, outside: Path) -> None:
    probe = (
        "import importlib.util as u, fedmq.node, fedmq.schemas, fedmq.compression;"
        "print([n for n in ('node','schemas','broker','aggregator') if u.find_spec(n)])"
    )
    result = subprocess.run(
        [str(installed / "python"), "-c", probe], cwd=outside, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_installed_demo_runs_outside_the_repository(installed: Path, outside: Path) -> None:
    result = run(
        installed,
        outside,
        *("demo", "--nodes", "3", "--rounds", "3", "--report", "r.json"),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((outside / "r.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["participants"] == 3 for r in report["rounds"])
    assert report["final_accuracy"] > 0.5


def test_installed_broker_init_writes_a_deployment(installed: Path, outside: Path) -> None:
    result = run(
        installed,
        outside,
        *("broker", "init", "deployment", "--nodes", "pi-01,pi-02", "--hostname", "hub.lan"),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    deployment = outside / "deployment"
    assert "listener 8883" in (deployment / "mosquitto.conf").read_text()
    for bundle in ("nodes/pi-01", "nodes/pi-02", "aggregator", "monitor"):
        assert (deployment / bundle / "fedmq.toml").is_file(), bundle


def test_installed_broker_serves_mqtt(installed: Path, outside: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = outside / "broker.log"
    with log.open("wb") as out:
        broker = subprocess.Popen(
            [str(installed / "fedmq"), "broker", "--port", str(port)],
            cwd=outside,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert broker.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    # MQTT 3.1.1 CONNECT, clean session, client id "w"; a broker answers CONNACK.
                    conn.sendall(bytes.fromhex("100d00044d5154540402003c000177"))
                    assert conn.recv(4) == bytes.fromhex("20020000")
                    break
            except OSError:
                assert time.monotonic() < deadline, "fedmq broker never accepted a connection"
                time.sleep(0.1)
    finally:
        broker.send_signal(signal.SIGINT)
        try:
            status = broker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
            raise
    assert status == 0
