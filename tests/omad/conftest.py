"""The VMware side's fixtures: a VMA simulator in the test's loop and the real daemons configured to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from omad.store.db import Database
from tests.sim.vcenter import VCenterSim
from tests.sim.vma import MiB, Inventory, SimState, VMASim

from ..rig import Api, Stack

VCENTER = "vcenter.sim.local"
USER = "administrator@vsphere.local"
PASSWORD = "VMware1!"
LONG_NAME = "long " + "ü/" * 60 + "x" * 80  # 205 characters, slashes and non-ASCII included
ODD_NAMES = ["web 01", "db/primary – ünïcödé", LONG_NAME]


def make_inventory() -> Inventory:
    """Three VMs: multi-disk, multi-NIC, names with spaces, '/', unicode and great length."""
    inv = Inventory(host=VCENTER, datacenter="DC1", username=USER, password=PASSWORD)
    inv.add_vm(ODD_NAMES[0], disks=2, nics=2, folder="Production", annotation="two disks, two NICs")
    inv.add_vm(ODD_NAMES[1], disks=[32 * MiB, 64 * MiB, 32 * MiB], nics=1, memory_mb=8192, num_cpu=4,
               guest_os="Microsoft Windows Server 2019 (64-bit)", os_type="windows")
    inv.add_vm(ODD_NAMES[2], disks=1, nics=3, power_state="poweredOff")
    return inv


def manual(**extra: Any) -> dict[str, Any]:
    """The manual-entry fields of a discovery request for the simulated vCenter."""
    return {"vcenter": VCENTER, "username": USER, "password": PASSWORD, "datacenter": "DC1", **extra}


@pytest.fixture
async def vma(tmp_path: Path) -> AsyncIterator[VMASim]:
    state = SimState(make_inventory(), workdir=tmp_path / "vmasim")
    async with VMASim(state=state) as sim:
        yield sim


def vma_config(url: str, *, timeout: float = 5.0, retries: int = 1) -> str:
    return (f'[vma]\nurl = "{url}"\ntimeout_seconds = {timeout}\ndiscover_timeout_seconds = {timeout}\n'
            f"retries = {retries}\nretry_delay_seconds = 0.05\n")


@pytest.fixture
def vstack(stack_config: Stack, vma: VMASim) -> Iterator[Stack]:
    """The four daemons, omad calling the VMA simulator (1.5 s time limit, one retry)."""
    stack_config.add_config("omad", "50-vma.toml", vma_config(vma.url, timeout=1.5))
    stack_config.start()
    yield stack_config


@pytest.fixture
async def api(vstack: Stack) -> AsyncIterator[Api]:
    """omad's API as the bootstrap administrator."""
    client = Api(vstack.url)
    await client.login("admin", vstack.admin_password)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def vcsim() -> Iterator[VCenterSim]:
    """A real vCenter simulator (govmomi) that pyvmomi logs in to."""
    with VCenterSim(username="oma@vsphere.local", password="s3cret pa$$ wörd", default_vms=False) as sim:
        yield sim


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """omad's database, migrated, in the test's directory (for in-process domain tests)."""
    d = Database(tmp_path / "oma.db")
    await d.open()
    await d.migrate()
    try:
        yield d
    finally:
        await d.close()
