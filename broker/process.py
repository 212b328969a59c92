"""Start mosquitto from the project's config on a chosen port, wait until it accepts
connections, and stop it by its PID."""

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger()

PROJECT_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"
_LISTENER = re.compile(r"^(\s*listener\s+)(\d+)(\s+127\.0\.0\.1\s*)$", re.MULTILINE)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def render_config(template: str, port: int) -> str:
    """The config with its loopback development listener moved to ``port``."""
    rendered, count = _LISTENER.subn(rf"\g<1>{port}\g<3>", template)
    if count != 1:
        raise ValueError("mosquitto.conf must have exactly one 'listener PORT 127.0.0.1' line")
    return rendered


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto")
    return found


class Mosquitto:
    """One mosquitto process; use as a context manager or call start()/stop()."""

    def __init__(
        self, *, port: int | None = None, config: Path = PROJECT_CONF, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, timeout: float = 10.0) -> "Mosquitto":
        if not self.config.exists():
            raise RuntimeError(f"mosquitto config {self.config} does not exist")
        self._workdir = tempfile.TemporaryDirectory(prefix="fedmq-broker-")
        conf = Path(self._workdir.name) / "mosquitto.conf"
        conf.write_text(render_config(self.config.read_text(), self.port))
        log_path = Path(self._workdir.name) / "mosquitto.log"
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._workdir.name,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker
            )
        deadline = time.monotonic() + timeout
        while not self._accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {output}")
            time.sleep(0.02)
        log.info("broker.started", address=self.address, pid=self.process.pid)
        return self

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, *, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("broker.stopped", pid=process.pid)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()
