"""Fixtures of the packaging tests: the .deb, built once per session in a copy of the working tree."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

import debbuild  # beside this file


def _require_build_tools() -> None:
    for tool in ("git", "make", "dpkg-buildpackage", "dpkg-checkbuilddeps", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup installs the Debian build tools)")
    p = subprocess.run(["dpkg-checkbuilddeps", str(debbuild.CONTROL)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"build dependencies missing (scripts/setup installs them): {p.stderr.strip()}")


@pytest.fixture(scope="session")
def deb_build(tmp_path_factory: pytest.TempPathFactory) -> debbuild.DebBuild:
    """`make deb` in a copy of the working tree (the tree itself is never touched)."""
    _require_build_tools()
    tree = tmp_path_factory.mktemp("deb-build") / "oma"
    debbuild.copy_worktree(tree)
    t0 = time.monotonic()
    deb, leftovers = debbuild.make_deb(tree)
    return debbuild.DebBuild(tree, deb, debbuild.deb_field(deb, "Version"), time.monotonic() - t0, leftovers)


@pytest.fixture(scope="session")
def upgrade_deb(deb_build: debbuild.DebBuild) -> debbuild.DebBuild:
    """The same tree built again with a higher version: what an upgrade installs."""
    debbuild.bump_version(deb_build.tree, "+upgrade1")
    t0 = time.monotonic()
    deb, leftovers = debbuild.make_deb(deb_build.tree)
    build = debbuild.DebBuild(deb_build.tree, deb, debbuild.deb_field(deb, "Version"), time.monotonic() - t0,
                              leftovers)
    assert build.version != deb_build.version and Path(build.deb) != Path(deb_build.deb)
    return build
