"""fedmq: federated learning for fleets of small devices over MQTT.

The Python API, small on purpose (docs/python-api.md): each command's settings as a
class, ``run`` to start the role they are for, and what a monitoring script needs to
read the topics. ``import fedmq`` loads none of JAX, numpy or paho; each name is
imported when first used.

    import fedmq

    settings = fedmq.AggregatorSettings(
        broker=fedmq.BrokerAddress.parse("hub.lan:1883"), federation="lab", nodes=4
    )
    fedmq.configure_logging()
    exit_status = fedmq.run(settings)
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "run": "fedmq.launch",
    "AggregatorSettings": "fedmq.aggregator.settings",
    "NodeSettings": "fedmq.node.settings",
    "NodeGroup": "fedmq.node.settings",
    "MonitorSettings": "fedmq.monitor_settings",
    "DemoSettings": "fedmq.demo_settings",
    "BrokerSettings": "fedmq.broker.settings",
    "BrokerAddress": "fedmq.mqtt",
    "Topics": "fedmq.schemas",
    "SchemaError": "fedmq.schemas",
    # fedmq.tasks.task imports neither JAX nor optax (an import-linter contract)
    "Task": "fedmq.tasks",
    "decode_status": "fedmq.schemas",
    "decode_server_status": "fedmq.schemas",
    "decode_metrics": "fedmq.schemas",
    "decode_global": "fedmq.schemas",
    "read_report": "fedmq.report",
    "load_params": "fedmq.model_file",
}
_RENAMED = {"configure_logging": ("fedmq.logs", "configure")}

__all__ = [  # the keys of _EXPORTS and _RENAMED (tests/unit/test_python_api.py)
    "AggregatorSettings",
    "BrokerAddress",
    "BrokerSettings",
    "DemoSettings",
    "MonitorSettings",
    "NodeGroup",
    "NodeSettings",
    "SchemaError",
    "Task",
    "Topics",
    "__version__",
    "configure_logging",
    "decode_global",
    "decode_metrics",
    "decode_server_status",
    "decode_status",
    "load_params",
    "read_report",
    "run",
]

if TYPE_CHECKING:
    from fedmq.aggregator.settings import AggregatorSettings
    from fedmq.broker.settings import BrokerSettings
    from fedmq.demo_settings import DemoSettings
    from fedmq.launch import run
    from fedmq.logs import configure as configure_logging
    from fedmq.model_file import load_params
    from fedmq.monitor_settings import MonitorSettings
    from fedmq.mqtt import BrokerAddress
    from fedmq.node.settings import NodeGroup, NodeSettings
    from fedmq.report import read_report
    from fedmq.schemas import (
        SchemaError,
        Topics,
        decode_global,
        decode_metrics,
        decode_server_status,
        decode_status,
    )
    from fedmq.tasks import Task


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name], name
    elif name in _RENAMED:
        module, attribute = _RENAMED[name]
    else:
        raise AttributeError(f"module 'fedmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
