"""The daemons' types are checked: `mypy --strict` over every package, as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_strict_passes_on_the_daemons() -> None:
    p = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=580)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
