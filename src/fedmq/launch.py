"""Start the role a settings object is for: the one assembler of roles, shared by the
``fedmq`` command and the Python API (``fedmq.run``).

The command line adds what only a command does: parsing arguments and the environment,
configuring logging, turning Ctrl-C and SIGTERM into ``stop``.
"""

import os
import sys
import threading
from dataclasses import replace

from fedmq.aggregator.settings import AggregatorSettings
from fedmq.broker.settings import BrokerSettings
from fedmq.demo_settings import DemoSettings
from fedmq.monitor_settings import MonitorSettings
from fedmq.mqtt import ConnectionSettings
from fedmq.node.settings import NodeGroup, NodeSettings

Settings = (
    AggregatorSettings | NodeSettings | NodeGroup | MonitorSettings | DemoSettings | BrokerSettings
)


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Run the role until it is done (0) or ``stop`` is set (130); the exit status the
    ``fedmq`` command would give. Credentials in the settings (``username``,
    ``password_file``, ``tls_*``) are checked and used; ValueError names a setting that
    cannot work. Roles load JAX, numpy and paho only here, when they start."""
    stop = stop if stop is not None else threading.Event()
    if isinstance(settings, ConnectionSettings):
        settings = settings.with_credentials()
    if isinstance(settings, BrokerSettings):
        return _run_broker(settings, stop)
    if isinstance(settings, AggregatorSettings) and settings.site is not None:
        from fedmq.aggregator.site_app import run as run_site

        return run_site(settings, stop)
    if isinstance(settings, AggregatorSettings):
        from fedmq.aggregator.app import run as run_aggregator

        return run_aggregator(settings, stop)
    if isinstance(settings, NodeSettings):
        _one_xla_thread()
        from fedmq.node.app import run as run_node

        return run_node(settings, stop)
    if isinstance(settings, NodeGroup):
        _one_xla_thread()  # the group's nodes take turns on one worker thread
        from fedmq.node.group import run as run_group

        nodes = tuple(node.with_credentials() for node in settings.nodes)
        return run_group(replace(settings, nodes=nodes), stop)
    if isinstance(settings, MonitorSettings):
        from fedmq.monitor import run as run_monitor

        return run_monitor(settings, stop)
    if isinstance(settings, DemoSettings):
        from fedmq.demo import run as run_demo

        return run_demo(settings, stop)
    raise TypeError(
        f"fedmq.run takes AggregatorSettings, NodeSettings, NodeGroup, MonitorSettings, "
        f"DemoSettings or BrokerSettings, not {type(settings).__name__}"
    )


def _one_xla_thread() -> None:
    """One XLA thread per node process: a device trains one tiny model, and on a shared
    machine ten nodes must not each spawn a thread pool per core. Only before JAX is
    imported."""
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _run_broker(chosen: BrokerSettings, stop: threading.Event) -> int:
    from fedmq.broker.process import PROJECT_CONF, Mosquitto

    conf = chosen.mosquitto_conf or PROJECT_CONF
    with Mosquitto(port=chosen.port or None, config=conf, die_with_parent=True) as broker:
        print(
            f"mosquitto listening on {broker.address} (pid {broker.pid}); Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(0.5):
            if broker.process is None or broker.process.poll() is not None:
                print(
                    f"fedmq broker: error: mosquitto exited: {broker.failure()}",
                    file=sys.stderr,
                )
                return 1
    return 0
