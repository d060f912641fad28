"""beneath.RootPaths: the rule nbd-pool and restore-mounter apply to a path omad names — inside a root as written,
and inside a root where its links really lead — for a root reached through a link root made and through one
anybody else could have planted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oma_common.beneath import RootPaths

pytestmark = [pytest.mark.root, pytest.mark.timeout(10)]


def test_a_root_reached_through_a_link_root_made_holds_paths_both_ways(tmp_path: Path) -> None:
    real = tmp_path / "data" / "repo"
    real.mkdir(parents=True)
    trusted = tmp_path / "etc"
    trusted.mkdir(mode=0o755)
    (trusted / "repo").symlink_to(real)
    roots = RootPaths([str(trusted / "repo")])
    assert roots.resolved == [real]
    assert roots.written_inside(trusted / "repo" / "a.qcow2") and roots.written_inside(real / "a.qcow2")
    assert roots.written_inside(str(trusted / "repo"))
    assert roots.really_inside(real / "a.qcow2") and not roots.really_inside(trusted / "repo" / "a.qcow2")
    assert not roots.written_inside(trusted / "repo" / ".." / "other")
    assert not roots.written_inside(tmp_path / "data" / "repository")  # a sibling sharing the name's prefix


def test_a_link_someone_else_could_have_planted_never_widens_a_root(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    theirs = tmp_path / "oma"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (theirs / "repositories").symlink_to(victim)
    roots = RootPaths([str(theirs / "repositories")])
    assert roots.resolved == [theirs / "repositories"]  # the link itself, not where it leads
    assert roots.written_inside(theirs / "repositories" / "shadow")
    assert not roots.really_inside(os.path.realpath(theirs / "repositories" / "shadow"))
    assert not RootPaths([])
