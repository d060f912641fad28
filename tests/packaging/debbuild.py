"""Building the .deb for the tests: `make deb` in a copy of the working tree, never in the tree itself."""

from __future__ import annotations

import email.utils
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTROL = REPO / "packaging/debian/control"


@dataclass
class DebBuild:
    tree: Path
    deb: Path
    version: str
    seconds: float
    leftovers: set[str]  # files the build added to the tree outside dist/ (should be none)


def copy_worktree(dst: Path) -> None:
    """The files git would commit (tracked and untracked, ignored ones excluded), links kept as links."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, still in the index
        out = dst / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, out)


def tree_files(tree: Path) -> set[str]:
    return {str(p.relative_to(tree)) for p in tree.rglob("*") if not p.is_dir()
            and p.relative_to(tree).parts[0] != "dist"}


def make_deb(tree: Path) -> tuple[Path, set[str]]:
    """Run `make deb` in `tree`; returns the package and what the build left behind outside dist/."""
    before = tree_files(tree)
    p = subprocess.run(["make", "deb"], cwd=tree, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"make deb failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    debs = sorted((tree / "dist").glob("oma-appliance_*_all.deb"), key=lambda d: d.stat().st_mtime)
    if not debs:
        raise RuntimeError(f"make deb made no package:\n{p.stdout[-2000:]}")
    return debs[-1], tree_files(tree) - before


def bump_version(tree: Path, suffix: str) -> str:
    """Prepend a changelog entry whose version is the current one plus `suffix` (an upgrade)."""
    changelog = tree / "packaging/debian/changelog"
    text = changelog.read_text()
    m = re.match(r"(\S+) \(([^)]+)\) (\S+); urgency=(\S+)", text)
    assert m, "unexpected changelog header"
    version = m.group(2) + suffix
    entry = (f"{m.group(1)} ({version}) {m.group(3)}; urgency={m.group(4)}\n\n"
             f"  * Test upgrade (built by tests/packaging).\n\n"
             f" -- OMA tests <oma-tests@localhost>  {email.utils.formatdate(usegmt=False)}\n\n")
    changelog.write_text(entry + text)
    return version


def control_depends() -> list[str]:
    """Package names in oma-appliance's Depends (first of each alternative, no versions, no substvars)."""
    text = CONTROL.read_text()
    m = re.search(r"^Depends:(.*?)(?=^\S)", text, re.M | re.S)
    assert m, "no Depends in packaging/debian/control"
    names = []
    for item in m.group(1).split(","):
        item = re.sub(r"#.*", "", item).strip()
        first = item.split("|")[0].strip()
        name = re.split(r"[\s(:\[]", first, maxsplit=1)[0]
        if name and not name.startswith("${"):
            names.append(name)
    return names


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


def deb_files(deb: Path) -> list[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return [line.split(None, 5)[5].split(" -> ")[0].removeprefix(".") for line in out.splitlines()]


def deb_control_file(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-I", str(deb), name], capture_output=True, text=True,
                          check=True).stdout
