"""Replication volume names: a VM name volume-agent takes as it is keeps `migration-<vm>-disk-<unit>`; one reduced
to fit (characters replaced or dropped, truncated) is given a short hash of the full name, so two VMs whose names
reduce to the same text each replicate into volumes of their own. The naming itself, then the real daemons with
the CloudStack and VMA simulators."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oma_common.contracts.volume_agent_volumes import VM_NAME, volume_name
from omad.replication.replications import volume_vm_name
from tests.sim.cloudstack import CloudStackSim
from tests.sim.vma import MiB

from ..rig import Stack
from .replication_rig import Rig, digest
from .test_replication import SIZES, open_twins

SAFE = ["app-01", "Web-Server", "db.prod_2", "A", "x" * 100, "0-._"]
REDUCED = ["app 01", "app  01", "app/01", "app_01 ", "Web Server", "Web: Server", "café", "cafè", "caf\u0065\u0301",
           "日本", "中国", "", " ", "-app-01", "_app-01", ".app-01", "app-01.", "app-01-", "x" * 101, "x" * 100 + "y",
           "x" * 100 + "z", "x" * 300, "x" * 299 + "y", "_" + "x" * 200, "\ud800bad"]


@pytest.mark.parametrize("name", SAFE)
def test_a_name_volume_agent_takes_as_it_is_keeps_its_volume_name(name: str) -> None:
    assert volume_vm_name(name) == name
    assert volume_name(volume_vm_name(name), 3) == f"migration-{name}-disk-3"


def test_names_reduced_to_the_same_text_name_different_volumes() -> None:
    names = [volume_vm_name(n) for n in SAFE + REDUCED]
    assert len(set(names)) == len(names), names
    assert volume_vm_name("app 01") == "app-01-a22b2178"  # stable: the same across versions and restarts
    assert volume_vm_name("Web Server") == "Web-Server-fc0480b1"
    assert volume_vm_name("app 01") != volume_vm_name("app-01") == "app-01"


@pytest.mark.parametrize("name", REDUCED)
def test_a_reduced_name_is_what_volume_agent_and_cloudstack_take(name: str) -> None:
    vm = volume_vm_name(name)
    assert re.fullmatch(VM_NAME, vm), vm
    assert re.fullmatch(r".*-[0-9a-f]{8}", vm), vm
    assert volume_vm_name(name) == vm
    assert len(volume_name(vm, 255)) <= 255


def test_long_names_keep_their_first_100_characters() -> None:
    long = "a" * 50 + " " + "b" * 200
    assert volume_vm_name(long).startswith("a" * 50 + "-" + "b" * 49 + "-")
    assert volume_vm_name(long) != volume_vm_name(long + "c")
    assert len(volume_vm_name("_" + "x" * 200)) <= 128


TWIN = "app-01"


@pytest.fixture
async def twins(cloudstack_sim: CloudStackSim, stack_config: Stack, tmp_path: Path) -> AsyncIterator[Rig]:
    """The rig's VM `app 01` and `app-01`, whose names reduce to the same text."""
    async with open_twins(stack_config, cloudstack_sim, tmp_path, TWIN) as r:
        yield r


@pytest.mark.root
@pytest.mark.timeout(240)
async def test_two_vms_whose_names_reduce_to_the_same_each_replicate_into_their_own_volumes(twins: Rig,
                                                                                          tmp_path: Path) -> None:
    """`app 01` replicates, then `app-01` (refused before with 409 "volume exists": the volume name was taken), and
    again each: every disk has a volume of its own holding that disk."""
    rig = twins
    first = await rig.sync()
    other = await rig.sync(vm=TWIN)
    assert first["replication_type"] == other["replication_type"] == "initial"
    mine = [d["volume_id"] for d in first["disks"]]
    theirs = [d["volume_id"] for d in other["disks"]]
    assert len(set(mine + theirs)) == 3, (mine, theirs)
    names = {v.id: v.name for v in rig.cs.inv.volumes.values() if v.name.startswith("migration-")}
    assert len(names) == 3, names
    # `app-01` is named as it always was; `app 01` is told apart by its hash.
    assert names[theirs[0]] == "migration-app-01-disk-0"
    assert [names[v] for v in mine] == ["migration-app-01-a22b2178-disk-0", "migration-app-01-a22b2178-disk-1"]
    rig.assert_volumes_hold_sources(first)
    source = tmp_path / "disk2.raw"  # the twin's one disk (open_twins)
    assert digest(rig.cs.devices.link(theirs[0]), SIZES[1]) == digest(source, SIZES[1])
    await rig.assert_released()
    # Each continues in its own volumes.
    rig.write(0, 2 * MiB, MiB, seed=5)
    again = await rig.sync()
    assert again["replication_type"] == "incremental"
    assert [d["volume_id"] for d in again["disks"]] == mine
    rig.assert_volumes_hold_sources(again)
    twice = await rig.sync(vm=TWIN)
    assert [d["volume_id"] for d in twice["disks"]] == theirs
    assert digest(rig.cs.devices.link(theirs[0]), SIZES[1]) == digest(source, SIZES[1])
    assert {v.id for v in rig.cs.inv.volumes.values() if v.name.startswith("migration-")} == set(names)
