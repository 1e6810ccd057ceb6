"""The import contracts in pyproject.toml bite: breaking a layer on purpose fails ``lint-imports``.

Each case edits a copy of the project's packages (never the checkout) and runs the
venv's ``lint-imports`` there, as ``make lint`` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of what ``lint-imports`` reads: the packages and modules it checks, and its config."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    ignore = shutil.ignore_patterns("__pycache__", "histories")
    for package in [*config["root_packages"], "scripts"]:
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    for module in config["root_modules"]:
        shutil.copy(REPO / f"{module}.py", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: `make setup` installs it (the dev extra)"
    # Wide lines, so that a contract's name and its verdict stay on one line.
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_project_as_it_is_keeps_every_contract(project: Path) -> None:
    result = lint_imports(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


LAYERS = "Layers: each imports only from the layers below it"
BENCH = "Only the bench (and its tests) import the bench"
NO_CYCLES = "No import cycles anywhere"


@pytest.mark.parametrize(
    ("path", "line", "broken", "shown"),
    [
        pytest.param(
            "adapters/_base.py", "import starter", LAYERS, "adapters._base -> starter", id="adapter"
        ),
        # worker.py is a module, not a package: import-linter sees it through scripts/import_contracts.py.
        pytest.param("worker.py", "import bench", BENCH, "worker -> bench", id="worker"),
        # A package's __init__ and its own module importing each other (acyclic_siblings misses it).
        pytest.param(
            "starter/cli/trades.py",
            "from starter.cli import run",
            NO_CYCLES,
            "starter.cli.trades -> starter.cli",
            id="cycle",
        ),
    ],
)
def test_an_import_against_the_layout_fails_naming_the_contract(
    project: Path, path: str, line: str, broken: str, shown: str
) -> None:
    with (project / path).open("a") as source:
        source.write(f"\n{line}\n")
    result = lint_imports(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{broken} BROKEN" in result.stdout, result.stdout
    assert shown in result.stdout, result.stdout
