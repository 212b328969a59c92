"""Start mosquitto from the project's config on a chosen port, wait until it accepts
connections, and stop, restart or kill it by its PID."""

import errno
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from types import TracebackType

import structlog

from fedmq.lifeline import tied

log = structlog.get_logger()

# The top-level mosquitto.conf, shipped in the wheel as this package's data (a wheel is
# installed unzipped, so the resource is a real file that mosquitto can be pointed at).
PROJECT_CONF = Path(str(resources.files(__package__ or "fedmq.broker") / "mosquitto.conf"))
PERSISTENCE_FILE = "mosquitto.db"  # mosquitto's default, as in mosquitto.conf
_LISTENER = re.compile(r"^(\s*listener\s+)(\d+)(\s+127\.0\.0\.1\s*)$", re.MULTILINE)
_PERSISTENCE_LOCATION = re.compile(r"^[ \t]*persistence_location[ \t].*$", re.MULTILINE)
_USER = re.compile(r"^[ \t]*user[ \t]", re.MULTILINE)
_ANY_LISTENER = re.compile(r"^[ \t]*listener[ \t]", re.MULTILINE)
_TLS_OPTION = re.compile(r"^[ \t]*(certfile|keyfile|psk_hint)[ \t]", re.MULTILINE)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def render_config(
    template: str, port: int, *, data_dir: Path | None = None, user: str | None = None
) -> str:
    """The config with its loopback development listener (the plain one, not a TLS
    listener) moved to ``port``; given ``data_dir``, its persistence directory there (added
    if the config has none); given ``user``, a ``user`` line unless the config has one (see
    ``Mosquitto.start``)."""
    # A TLS listener on loopback (a config from `fedmq broker init --listen 127.0.0.1`) is
    # not the development listener: it keeps its port.
    starts = [m.start() for m in _ANY_LISTENER.finditer(template)] + [len(template)]
    plain = [
        m
        for m in _LISTENER.finditer(template)
        if not _TLS_OPTION.search(template, m.end(), min(s for s in starts if s >= m.end()))
    ]
    if len(plain) != 1:
        raise ValueError("mosquitto.conf must have exactly one 'listener PORT 127.0.0.1' line")
    [m] = plain
    rendered = f"{template[: m.start()]}{m.group(1)}{port}{m.group(3)}{template[m.end() :]}"
    if user is not None and not _USER.search(rendered):
        rendered = f"{rendered.rstrip()}\nuser {user}\n"
    if data_dir is None:
        return rendered
    location = str(data_dir.resolve())
    if "\n" in location or "\r" in location:
        raise ValueError(f"persistence directory {location!r} has a line break")
    # mosquitto 2.0 adds the "/" before the file name itself; 1.x needed it here.
    line = f"persistence_location {location.rstrip('/')}/"
    rendered, count = _PERSISTENCE_LOCATION.subn(lambda _: line, rendered)
    if count > 1:
        raise ValueError("mosquitto.conf has more than one persistence_location line")
    return rendered if count == 1 else f"{rendered.rstrip()}\n{line}\n"


def port_in_use(host: str, port: int) -> bool:
    """Whether another socket holds ``host:port``, so mosquitto could not listen there.
    Bound as mosquitto binds (SO_REUSEADDR), so a port left in TIME_WAIT counts as free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto")
    return found


class Mosquitto:
    """One mosquitto process; use as a context manager or call start()/stop().

    Its persistence file (retained messages, persistent sessions, queued messages) is in
    ``data_dir``, or, without one, in a temporary directory that lives until ``stop()``:
    ``restart()`` and ``kill()`` followed by ``start()`` keep it, so a restarted broker
    comes back with what it had saved. Two objects given the same ``data_dir`` and port
    act as one broker stopped and started again.

    With ``die_with_parent``, mosquitto ends when the thread that called ``start()`` does
    (``fedmq.lifeline``), even if this process is SIGKILLed.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        config: Path = PROJECT_CONF,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.host = host
        self.die_with_parent = die_with_parent
        self.port = port if port is not None else free_port(host)
        self.config = config
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def persistence_path(self) -> Path:
        """Where mosquitto keeps its database (it exists once mosquitto has saved)."""
        return self._data_dir() / PERSISTENCE_FILE

    @property
    def log_path(self) -> Path:
        """mosquitto's stderr and stdout, all runs of this object until ``stop()``."""
        return self._work() / "mosquitto.log"

    def _work(self) -> Path:
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="fedmq-broker-")
        return Path(self._workdir.name)

    def _data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self._work() / "data"

    def start(self, *, timeout: float = 10.0) -> "Mosquitto":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"mosquitto is already running (pid {self.process.pid})")
        if not self.config.exists():
            raise RuntimeError(f"mosquitto config {self.config} does not exist")
        # Checked first: with the port taken, the other program would accept our
        # connection test below while mosquitto fails.
        if port_in_use(self.host, self.port):
            raise RuntimeError(
                f"{self.address} is already in use (another broker running?): stop it, "
                "or choose another --port"
            )
        data_dir = self._data_dir()
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = self._work() / "mosquitto.conf"
        # Started as root, mosquitto switches to the user "mosquitto", who could not write
        # a data directory we made; so it runs as us (a non-root mosquitto ignores `user`).
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf.write_text(
            render_config(self.config.read_text(), self.port, data_dir=data_dir, user=user)
        )
        with self.log_path.open("ab") as log_file:
            command = [mosquitto_binary(), "-c", str(conf)]
            self.process = subprocess.Popen(
                tied(command) if self.die_with_parent else command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._work(),
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker
            )
        deadline = time.monotonic() + timeout
        while not self._accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                reason = self.failure()
                self.stop()
                raise RuntimeError(reason)
            time.sleep(0.02)
        log.info("broker.started", address=self.address, pid=self.process.pid)
        return self

    def failure(self) -> str:
        """Why mosquitto did not start or ended, in one line, from its log."""
        output = self.log_path.read_text(errors="replace") if self._workdir else ""
        if "Address already in use" in output:
            return (
                f"mosquitto cannot listen: an address in {self.config} is already in use "
                "(another broker running?): stop it, or change the port"
            )
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line.split("Error: ", 1)[1] for line in lines if "Error: " in line]
        reason = errors[-1] if errors else lines[-1] if lines else "no output"
        return f"mosquitto did not start on port {self.port}: {reason} (config {self.config})"

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        """Send ``sig`` to our mosquitto and reap it (SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("broker.stopped", pid=process.pid, signal=sig.name)

    def stop(self, *, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its database on the way out), then remove the
        temporary directory this object created; ``data_dir`` is left in place."""
        self._end(signal.SIGTERM, timeout)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved beyond the last autosave. The
        persistence file stays for the next ``start()``."""
        self._end(signal.SIGKILL, timeout=5.0)

    def restart(self, *, timeout: float = 10.0) -> "Mosquitto":
        """Stop cleanly (the database is saved) and start again on the same port with
        the same persistence file."""
        self._end(signal.SIGTERM, timeout=5.0)
        return self.start(timeout=timeout)

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()
