"""The VM inventory: filled by discovery and by the VMA's push, read by /vms and /vms/{id}."""

from __future__ import annotations

import pytest

from tests.sim.vma import VMASim

from ..rig import Api, Stack
from .conftest import ODD_NAMES, VCENTER, manual

pytestmark = pytest.mark.timeout(120)


async def test_discovery_fills_the_inventory(vstack: Stack, api: Api, vma: VMASim) -> None:
    assert (await api.get("/vms"))[1] == {"vms": [], "count": 0, "total": 0, "limit": 1000, "offset": 0}
    await api.post("/discovery/discover-vms", manual())
    await api.post("/discovery/add-vms", {**manual(), "vm_names": [ODD_NAMES[0]]})
    status, listing = await api.get("/vms")
    assert status == 200 and listing["count"] == 3
    truth = {vm["id"]: vm for vm in vma.state.inventory.discovery()["vms"]}
    for vm in listing["vms"]:
        assert {k: vm[k] for k in truth[vm["id"]]} == truth[vm["id"]]
        assert vm["vcenter_host"] == VCENTER and vm["source"] == "discovery"
        assert vm["managed"] is (vm["name"] == ODD_NAMES[0]) and (vm["context_id"] is None) is not vm["managed"]
    vm_id = vma.state.inventory.vms[1].id
    status, one = await api.get(f"/vms/{vm_id}")
    assert status == 200 and one["name"] == ODD_NAMES[1] and len(one["disks"]) == 3
    assert (await api.get("/vms/00000000-0000-0000-0000-000000000000"))[0] == 404
    assert (await api.get("/vms", params={"limit": "1", "offset": "2"}))[1]["count"] == 1
    assert (await api.get("/vms", params={"vcenter_host": "other"}))[1]["total"] == 0


async def test_the_vma_pushes_its_inventory(vstack: Stack, api: Api, vma: VMASim) -> None:
    body = vma.state.inventory.discovery()
    body["vms"][0]["disks"] = None  # Go's nil slice
    status, result = await api.post("/vms/inventory", body)
    assert status == 200 and (result["received"], result["new_vms"]) == (3, 3)
    body["vms"][1]["power_state"] = "suspended"
    status, result = await api.post("/vms/inventory", body)
    assert (result["received"], result["new_vms"]) == (3, 0)
    one = (await api.get(f"/vms/{body['vms'][1]['id']}"))[1]
    assert one["power_state"] == "suspended" and one["source"] == "vma_push"
    assert (await api.get(f"/vms/{body['vms'][0]['id']}"))[1]["disks"] == []
    bad = {"vcenter": {"host": VCENTER}, "vms": [{"name": "no id"}]}
    status, err = await api.post("/vms/inventory", bad)
    assert status == 400 and "vms[0].id" in err["details"]
    assert vstack.sql("SELECT COUNT(*) FROM vm_inventory") == [(3,)]
