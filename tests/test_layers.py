"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and each one catches a
wrong import: the suite fails the moment a service imports another or a layer points up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("disagfusion", "services", "disagfusion_cli")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"]
    return subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=120)


def test_the_code_keeps_its_layers() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        ("services/dit/__main__.py", "import services.encoder.worker", "Services never import one another"),
        ("disagfusion/bus.py", "import services.scheduler.pool", "The shared runtime imports neither the services nor the CLI"),
        ("services/scheduler/pool.py", "import disagfusion_cli.common", "Services do not import the CLI"),
        ("disagfusion/protocol.py", "import disagfusion.bus", "Layers inside disagfusion point one way"),
    ],
)
def test_a_wrong_import_breaks_its_contract(tmp_path: Path, module: str, wrong_import: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{wrong_import}\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert f"{contract} BROKEN" in done.stdout, done.stdout
