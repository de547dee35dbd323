"""The import rules in pyproject.toml ([tool.importlinter]) hold, and catch a reverse import.

`lint-imports` reads the source only (grimp parses imports; nothing is executed), so each check
runs in a second or less: on the real tree, then on copies of the package under tmp_path with
one deliberate violation each, which must fail and name the contract they break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = "hellora_pl layers: the CLI on top, the kernels at the bottom"
NO_LIGHTNING = "Lightning only in the CLI, the LightningModule, callbacks and data modules"
ACYCLIC = "No import cycles between the modules or subpackages of any hellora_pl package"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the hellora_pl package under `root`, with the contracts in REPO's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}  # the package under root, not the installed one
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--no-logo", str(REPO / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "hellora_pl", tmp_path / "hellora_pl", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_contracts_are_kept_on_the_tree():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (LAYERS, NO_LIGHTNING, ACYCLIC):
        assert f"{contract} KEPT" in result.stdout


@pytest.mark.parametrize(
    "module, line, broken, reported",
    [
        # kernels importing adapters back: a layer violation and a cycle between siblings
        (
            "kernels/__init__.py",
            "import hellora_pl.adapters",
            (LAYERS, ACYCLIC),
            "hellora_pl.kernels -> hellora_pl.adapters",
        ),
        # backbones importing quant back (the loop loading.py used to hide inside functions)
        (
            "backbones/registry.py",
            "from ..quant import quantize_model",
            (LAYERS, ACYCLIC),
            "hellora_pl.backbones is not allowed to import hellora_pl.quant",
        ),
        # Lightning in the expert path
        ("kernels/reference.py", "import lightning", (NO_LIGHTNING,), "hellora_pl.kernels.reference -> lightning"),
    ],
    ids=["kernels-import-adapters", "backbones-import-quant", "kernels-import-lightning"],
)
def test_a_reverse_import_breaks_the_contract(tmp_path, module, line, broken, reported):
    root = package_copy(tmp_path)
    path = root / "hellora_pl" / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout
    for contract in broken:
        assert f"{contract} BROKEN" in result.stdout, result.stdout
    assert reported in result.stdout, result.stdout
    for contract in {LAYERS, NO_LIGHTNING, ACYCLIC} - set(broken):
        assert f"{contract} KEPT" in result.stdout, result.stdout  # the violation is the only change
