"""The .deb runs on Debian 12's python3-* packages (aiohttp 3.8, aiosqlite 0.17, pyvmomi 6.7, psutil 5.9),
while the suite's venv has current PyPI releases. Run the core of the suite once more under /usr/bin/python3
with Debian's packages only, so a call that exists only in newer releases fails here, not on an appliance."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")
# In-process and full-stack tests of the shared edge, omad's core and the agents' life cycle, and the
# end-to-end work the .deb exists for: backups (full, incremental, failures), immutability and restores.
SUBSET = [
    "tests/common/test_schema.py", "tests/common/test_config.py", "tests/common/test_fdpass.py",
    "tests/common/test_filestream.py",
    "tests/agents/test_lifecycle.py", "tests/agents/test_contracts.py",
    "tests/omad/test_guard.py", "tests/omad/test_edge.py", "tests/omad/test_auth.py", "tests/omad/test_store.py",
    "tests/omad/test_jobs.py", "tests/omad/test_health.py", "tests/omad/test_contexts.py",
    "tests/omad/backup/test_backups.py", "tests/omad/backup/test_failures.py",
    "tests/omad/backup/test_immutability.py", "tests/omad/backup/test_restore.py",
    # Debian's cs is 2.7.1 (its own aiohttp session per call, another signing path): the clients of omad and
    # volume-agent, and the simulator.
    "tests/omad/test_cloudstack_client.py", "tests/sim/test_cloudstack_sim.py", "tests/volume_agent/test_volumes.py",
]
MODULES = ["aiohttp", "aiosqlite", "psutil", "sdnotify", "pyVmomi", "cs", "cryptography", "argon2", "pytest",
           "pytest_asyncio", "pytest_timeout"]


def debian_python_ready() -> str:
    if not DEBIAN_PYTHON.exists():
        return "no /usr/bin/python3"
    probe = subprocess.run([str(DEBIAN_PYTHON), "-c", f"import {', '.join(MODULES)}"], capture_output=True,
                           text=True, env={"PATH": "/usr/bin:/bin"})
    return "" if probe.returncode == 0 else f"Debian's python3 lacks a module: {probe.stderr.strip()[-200:]}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_core_suite_passes_on_debian_12_packages() -> None:
    missing = debian_python_ready()
    if missing:
        pytest.fail(f"{missing} (scripts/setup installs python3-* packages; run `make setup`)")
    versions = subprocess.run([str(DEBIAN_PYTHON), "-c", "import aiohttp, aiosqlite; print(aiohttp.__version__, "
                               "aiosqlite.__version__)"], capture_output=True, text=True).stdout.split()
    assert versions[0].startswith("3.8"), f"expected Debian 12's aiohttp 3.8, found {versions}"
    paths = ":".join(str(ROOT / "daemons" / d) for d in ("common", "omad", "nbd-pool", "restore-mounter",
                                                          "volume-agent"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=paths, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    run = subprocess.run([str(DEBIAN_PYTHON), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-W", "ignore::pytest.PytestConfigWarning", *SUBSET], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
