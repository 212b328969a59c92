"""The layers of docs/architecture.md, as import-linter contracts in pyproject.toml.

They are checked on the installed package (what a wheel holds), every import counted,
including the ones inside functions that keep ``fedmq --help`` free of JAX.
"""

import subprocess
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), str(config), "--no-cache"],
        cwd=tmp_path,  # not the checkout: the installed package is analysed
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_layer_contract_is_kept(tmp_path):
    result = lint(tmp_path, PYPROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The same check on a contract the package breaks (the CLI imports roles): it fails."""
    upside_down = tmp_path / "upside-down.toml"
    upside_down.write_text(
        "[tool.importlinter]\n"
        'root_package = "fedmq"\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "roles above the CLI"\n'
        'type = "layers"\n'
        'layers = ["fedmq.aggregator", "fedmq.cli"]\n'
    )
    result = lint(tmp_path, upside_down)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fedmq.cli -> fedmq.aggregator" in result.stdout
