"""Golden wire samples: the committed bytes under tests/golden/ are the format.

If one of these fails after a source change, the wire format changed. Either undo the
change, or regenerate with ``python tests/golden/make_golden.py``, review the diff and
decide whether SCHEMA_VERSION must move.
"""

import importlib.util
import sys
from pathlib import Path

import msgpack
import pytest

from fedmq.schemas import SCHEMA_VERSION, encode

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"


def _load(module_name: str, path: Path):
    # tests/ is not a package; load the shared sample definitions by path.
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


samples = _load("fedmq_golden_samples", GOLDEN_DIR / "samples.py")
NAMES = sorted(samples.SAMPLES)


def test_every_golden_file_has_a_sample_and_every_sample_a_file():
    on_disk = sorted(path.stem for path in GOLDEN_DIR.glob("*.msgpack"))
    assert on_disk == NAMES


def test_there_is_a_sample_of_every_message_kind():
    kinds = {type(sample.message).__name__ for sample in samples.SAMPLES.values()}
    assert kinds == {
        "GlobalModel", "GlobalDelta", "NodeUpdate", "NodeStatus", "ServerStatus", "RoundMetrics",
    }  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_encode_gives_the_golden_bytes_exactly(name):
    sample = samples.SAMPLES[name]
    assert encode(sample.message) == samples.golden_path(name).read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_decoding_the_golden_file_gives_the_sample_back(name):
    sample = samples.SAMPLES[name]
    decoded = sample.decode(samples.golden_path(name).read_bytes())
    assert type(decoded) is type(sample.message)
    assert samples.plain(decoded) == samples.plain(sample.message)


@pytest.mark.parametrize("name", NAMES)
def test_golden_file_is_a_version_1_map_that_starts_with_v_and_type(name):
    wire = msgpack.unpackb(samples.golden_path(name).read_bytes(), raw=False)
    assert SCHEMA_VERSION == 1
    assert list(wire)[:2] == ["v", "type"]
    assert wire["v"] == 1


def _make_golden(monkeypatch):
    # make_golden.py does `from samples import ...`: hand it the module loaded above.
    monkeypatch.setitem(sys.modules, "samples", samples)
    spec = importlib.util.spec_from_file_location(
        "fedmq_golden_make", GOLDEN_DIR / "make_golden.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_golden_check_passes_on_the_committed_files(monkeypatch):
    make_golden = _make_golden(monkeypatch)
    assert make_golden.stale() == []
    assert make_golden.main(["--check"]) == 0


def test_make_golden_writes_the_committed_bytes(monkeypatch, tmp_path, capsys):
    make_golden = _make_golden(monkeypatch)
    monkeypatch.setattr(samples, "GOLDEN_DIR", tmp_path)
    assert make_golden.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert make_golden.main([]) == 0
    assert make_golden.main(["--check"]) == 0
    for name in NAMES:
        assert (tmp_path / f"{name}.msgpack").read_bytes() == (
            GOLDEN_DIR / f"{name}.msgpack"
        ).read_bytes()
