"""The Python API of fedmq/__init__.py (docs/python-api.md): what it names, that it loads
nothing heavy, and that ``fedmq.run`` refuses what it cannot start."""

import subprocess
import sys
import threading

import pytest

import fedmq
from fedmq.demo import child_environment


def test_every_public_name_resolves_and_is_listed():
    for name in fedmq.__all__:
        assert getattr(fedmq, name) is not None, name
    assert sorted(fedmq.__all__) == sorted(dir(fedmq))
    assert fedmq.configure_logging is fedmq.logs.configure


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Aggregator'"):
        fedmq.Aggregator  # noqa: B018


def test_importing_fedmq_and_making_settings_loads_no_jax_or_numpy():
    code = (
        "import sys, fedmq\n"
        "fedmq.NodeSettings(node_id='pi-01', data='d.npz')\n"
        "fedmq.AggregatorSettings(federation='lab', nodes=4)\n"
        "print(sorted(m for m in ('jax', 'numpy', 'optax') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_names_what_it_takes():
    with pytest.raises(TypeError, match="not dict"):
        fedmq.run({"nodes": 3}, threading.Event())  # type: ignore[arg-type]


def test_run_checks_the_credentials_it_is_given(tmp_path):
    settings = fedmq.MonitorSettings(federation="lab", password_file=tmp_path / "absent")
    with pytest.raises(ValueError, match="broker credentials"):
        fedmq.run(settings)


def test_the_demo_children_get_no_deployment_settings():
    environ = {"PATH": "/bin", "FEDMQ_CONFIG": "/etc/fedmq.toml", "FEDMQ_NODE_DATA": "x.npz"}
    assert child_environment(environ) == {"PATH": "/bin"}
