"""Tests of the vCenter simulator and its helper against real vcsim processes."""

from __future__ import annotations

import socket
import time
from typing import Any, Iterator

import pytest
from pyVmomi import vim

from . import vcenter

# The first test in a fresh cache builds the binary (~25 s cold on 2 cores); later ones take < 1 s.
pytestmark = pytest.mark.timeout(300)

USER = "oma-test@vsphere.local"
PASSWORD = "s3cret pa$$ wörd"
EXTRA = [
    vcenter.VMSpec("db 01", disks=3, disk_gb=40, nics=2, cpus=4, memory_mb=8192, power_on=True),
    vcenter.VMSpec("web/app ü", disks=1, disk_gb=2, nics=3, provisioning="eagerZeroedThick"),
    vcenter.VMSpec("50% off\\x", disks=0, nics=0, guest_id="windows9Server64Guest", provisioning="thick"),
]


@pytest.fixture(scope="module")
def sim() -> Iterator[vcenter.VCenterSim]:
    with vcenter.VCenterSim(username=USER, password=PASSWORD, vms=EXTRA) as running:
        yield running


@pytest.fixture(scope="module")
def vms(sim: vcenter.VCenterSim) -> dict[str, dict[str, Any]]:
    return {vm["name"]: vm for vm in vcenter.inventory(sim)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ready_line_gives_the_address(sim: vcenter.VCenterSim) -> None:
    assert sim.url == f"https://127.0.0.1:{sim.port}/sdk"
    assert sim.host == f"127.0.0.1:{sim.port}"
    assert (sim.username, sim.password) == (USER, PASSWORD)


def test_login_with_right_password(sim: vcenter.VCenterSim) -> None:
    with vcenter.connect(sim.host, USER, PASSWORD) as si:
        assert si.content.about.apiType == "VirtualCenter"
        sessions = si.content.sessionManager
        assert sessions is not None and sessions.currentSession is not None
        assert sessions.currentSession.userName == USER


@pytest.mark.parametrize("user, password", [(USER, "wrong"), ("someone-else", PASSWORD), (USER, "")])
def test_wrong_credentials_are_refused(sim: vcenter.VCenterSim, user: str, password: str) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        with vcenter.connect(sim.host, user, password):
            pass


def test_closed_port_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        with vcenter.connect(f"127.0.0.1:{free_port()}", USER, PASSWORD):
            pass
    assert time.monotonic() - started < 5


def test_inventory_has_default_and_extra_vms(vms: dict[str, dict[str, Any]]) -> None:
    assert sorted(vms) == sorted(
        ["DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "db 01", "web%2fapp ü", "50%25 off%5cx"]
    )
    assert len({vm["id"] for vm in vms.values()}) == len(vms)
    for vm in vms.values():
        assert vm["datacenter"] == "DC0"
        assert vm["path"] == f"/DC0/vm/{vm['name']}"
        macs = [nic["mac_address"] for nic in vm["networks"]]
        assert len(set(macs)) == len(macs)
    default = vms["DC0_H0_VM0"]
    assert default["power_state"] == "poweredOn"
    assert [d["id"] for d in default["disks"]] == ["disk-2000"]
    assert len(default["networks"]) == 1


def test_inventory_disks(vms: dict[str, dict[str, Any]]) -> None:
    db = vms["db 01"]
    assert (db["num_cpu"], db["memory_mb"], db["power_state"]) == (4, 8192, "poweredOn")
    assert db["disks"] == [
        {
            "id": f"disk-{2000 + i}",
            "label": f"Hard disk {i + 1}",
            "path": f"[LocalDS_0] db 01/{stem}.vmdk",
            "vmdk_path": f"[LocalDS_0] db 01/{stem}.vmdk",
            "size_gb": 40,
            "capacity_bytes": 40 * 1024**3,
            "datastore": "LocalDS_0",
            "provisioning_type": "thin",
            "unit_number": i,
        }
        for i, stem in enumerate(["db 01", "db 01_1", "db 01_2"])
    ]
    assert vms["web%2fapp ü"]["disks"][0]["provisioning_type"] == "eagerZeroedThick"
    assert vms["web%2fapp ü"]["disks"][0]["path"] == "[LocalDS_0] web%2fapp ü/web%2fapp ü.vmdk"


def test_inventory_networks(vms: dict[str, dict[str, Any]]) -> None:
    web = vms["web%2fapp ü"]
    assert web["power_state"] == "poweredOff"
    assert [(n["label"], n["network_name"], n["type"], n["adapter_type"]) for n in web["networks"]] == [
        ("Network adapter 1", "VM Network", "standard", "vmxnet3"),
        ("Network adapter 2", "DC0_DVPG0", "distributed", "e1000e"),
        ("Network adapter 3", "VM Network", "standard", "e1000"),
    ]
    assert all(n["connected"] and n["mac_address"].startswith("00:50:56:") for n in web["networks"])


def test_inventory_vm_without_devices(vms: dict[str, dict[str, Any]]) -> None:
    bare = vms["50%25 off%5cx"]
    assert (bare["disks"], bare["networks"]) == ([], [])
    assert (bare["guest_os"], bare["os_type"]) == ("windows9Server64Guest", "windows")


def test_sigterm_exits_cleanly() -> None:
    sim = vcenter.VCenterSim(default_vms=False, vms=[vcenter.VMSpec("only")]).start()
    assert [vm["name"] for vm in vcenter.inventory(sim)] == ["only"]
    assert sim.stop() == 0
    assert sim.leftovers == []  # the datastore temp dirs were removed by the child itself


def test_busy_port_is_reported() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sim = vcenter.VCenterSim(port=port)
        with pytest.raises(vcenter.VCenterSimError, match="address already in use"):
            sim.start()
    assert sim.returncode not in (None, 0)


def test_child_that_dies_before_ready_is_reported() -> None:
    sim = vcenter.VCenterSim(vms=[vcenter.VMSpec("x", provisioning="bogus")])
    with pytest.raises(vcenter.VCenterSimError, match='unknown provisioning "bogus"'):
        sim.start()
    assert sim.returncode == 2


def test_build_is_cached() -> None:
    binary = vcenter.build_vcsim()
    before = binary.stat().st_mtime_ns
    assert vcenter.build_vcsim() == binary
    assert binary.stat().st_mtime_ns == before
