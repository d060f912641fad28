"""Static checks of the systemd units: `systemd-analyze verify` and `security --offline=true` in a scratch root.

Used by tests/packaging/test_units.py and, as a script, by `make unit-report` (stdlib only, any python3).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
SERVICES = ("omad.service", "nbd-pool.service", "restore-mounter.service", "volume-agent.service")
UNITS = (*SERVICES, "oma.target")

# Highest exposure each service may have (systemd-analyze security --offline=true, 0-10). omad's is the
# issue's target; the root agents' are their figures when their namespace-free hardening was last
# tightened, so that a change which loosens a unit fails here until the number is raised knowingly (with
# the reason written in the unit).
# The agents' +0.2: no RestrictSUIDSGID=, which would break their openat2(2) (see the units).
EXPOSURE_TARGETS = {
    "omad.service": 2.0,
    "nbd-pool.service": 4.5,
    "restore-mounter.service": 4.2,
    "volume-agent.service": 4.7,  # mounts shares and sets immutable flags: see the unit's capability list
}

HOST_UNITS = Path("/usr/lib/systemd/system")
_EXPOSURE = re.compile(r"Overall exposure level for (\S+): ([0-9.]+)")


def parse_unit(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value assigned (units may repeat keys; an empty assignment resets)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        values = out.setdefault(f"{section}.{key.strip()}", [])
        if value.strip() == "":
            values.clear()
        values.append(value.strip())
    return out


def exec_paths(unit: Path) -> list[str]:
    """The programs a unit runs (ExecStart= and friends), without systemd's prefixes (-, @, +, !)."""
    paths = []
    for key, values in parse_unit(unit).items():
        if key.startswith("Service.Exec"):
            for v in values:
                if v:
                    paths.append(v.lstrip("-@+!:").split()[0])
    return paths


@contextmanager
def scratch_root() -> Iterator[Path]:
    """A directory that looks enough like an installed appliance for systemd-analyze --root=.

    The host's units (so that sysinit.target, modprobe@.service ... resolve), ours beside them, and an
    executable stub at every path our units run, so that verify checks our units rather than whether the
    package happens to be installed on this machine.
    """
    with tempfile.TemporaryDirectory(prefix="oma-units-") as tmp:
        root = Path(tmp)
        units = root / "usr/lib/systemd/system"
        shutil.copytree(HOST_UNITS, units, symlinks=True)
        (root / "lib").symlink_to("usr/lib")
        for name in UNITS:
            shutil.copy(UNIT_DIR / name, units / name)
            for prog in exec_paths(UNIT_DIR / name):
                stub = root / prog.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
        yield root


def verify(root: Path, units: tuple[str, ...] = UNITS) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify; it exits 0 on unknown keys and bad values, so callers also demand silence."""
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units],
                          capture_output=True, text=True, timeout=60)


def security(root: Path, unit: str) -> tuple[float, str]:
    """(overall exposure, the analyzer's table) of one unit, offline."""
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
                       capture_output=True, text=True, timeout=60)
    text = p.stdout + p.stderr
    m = _EXPOSURE.search(text)
    if m is None:
        raise RuntimeError(f"systemd-analyze security {unit} printed no exposure level (exit {p.returncode}):\n"
                           f"{text}")
    return float(m.group(2)), text


def report() -> int:
    """Print each service's exposure against its target and what is left exposed; 1 if one is above."""
    worst = 0
    with scratch_root() as root:
        rows = []
        for unit in SERVICES:
            exposure, table = security(root, unit)
            target = EXPOSURE_TARGETS[unit]
            rows.append((unit, exposure, target))
            print(f"== {unit}: exposure {exposure:.1f} (target <= {target:.1f})")
            for line in table.splitlines():
                if line.startswith("✗"):
                    print("   " + line.rstrip())
        print()
        print(f"{'unit':<26} {'exposure':>8} {'target':>7}")
        for unit, exposure, target in rows:
            flag = "ok" if exposure <= target else "ABOVE TARGET"
            worst |= exposure > target
            print(f"{unit:<26} {exposure:>8.1f} {target:>7.1f}  {flag}")
    return 1 if worst else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["report"]:
        sys.exit("usage: units_check.py report")
    sys.exit(report())
