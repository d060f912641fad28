"""Network mappings: CRUD, destinations checked against CloudStack, and which source networks are mapped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from omad.inventory.contexts import Contexts
from omad.inventory.vmspec import NicSpec, VmSpec
from omad.store import network_mappings, ossea
from omad.store.db import Database
from tests.sim.cloudstack import CloudStackSim, running

from ..rig import Api, Stack

pytestmark = pytest.mark.timeout(120)

VM = "db/primary – ünï"  # a slash and non-ASCII: addressed by context id in paths


@pytest.fixture
def cs(short_tmp: Path) -> Iterator[CloudStackSim]:
    with running(short_tmp / "cs", short_tmp / "by-id") as sim:
        yield sim


@pytest.fixture
def stack(stack_config: Stack, cs: CloudStackSim) -> Iterator[Stack]:
    """omad alone, with a saved CloudStack config and a VM context with three NICs on two VMware networks."""
    stack_config.add_config("omad", "50-cloudstack.toml", "[cloudstack]\ntimeout_seconds = 5\n")
    stack_config.start("omad")
    stack_config.sql("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
                     "created_at, updated_at) VALUES ('ctx-db', ?, '4210-aaaa', '/DC1/vm/db', 'vc', 't', 't')", (VM,))
    for pos, name in enumerate(("VM Network", "Backup LAN", "VM Network")):
        stack_config.sql("INSERT INTO vm_networks (vm_context_id, position, label, network_name) "
                         "VALUES ('ctx-db', ?, ?, ?)", (pos, f"Network adapter {pos + 1}", name))
    yield stack_config


@pytest.fixture
async def admin(admin: Api, cs: CloudStackSim) -> Api:
    """The shared administrator, once the default CloudStack config is saved."""
    status, _ = await admin.post("/ossea/config", {"action": "create", "config": {
        "name": "primary", "api_url": cs.endpoint, "api_key": cs.api_key, "secret_key": cs.secret_key,
        "zone": next(iter(cs.inv.zones)), "oma_vm_id": cs.appliance_vm_id}})
    assert status == 200
    return admin


def net(cs: CloudStackSim, name: str) -> str:
    return next(n.id for n in cs.inv.networks.values() if n.name == name)


async def test_mappings_crud_and_status(stack: Stack, admin: Api, cs: CloudStackSim) -> None:
    prod, test = net(cs, "prod-net"), net(cs, "test-net")
    status, st = await admin.get("/network-mappings/ctx-db/status")
    assert status == 200 and st["success"] is True
    data = st["data"]
    assert data["source_networks"] == ["VM Network", "Backup LAN"] and data["vm_id"] == VM
    assert data["live"]["unmapped"] == ["VM Network", "Backup LAN"] and data["mapping_complete"] is False

    status, created = await admin.post("/network-mappings", {"vm_id": VM, "source_network_name": "VM Network",
                                                             "destination_network_id": prod,
                                                             "destination_network_name": "whatever"})
    assert status == 201 and created["success"] is True, created
    m = created["data"]
    assert (m["vm_id"], m["vm_context_id"], m["destination_network_id"], m["is_test_network"]) == \
        (VM, "ctx-db", prod, False)
    assert m["destination_network_name"] == "prod-net"  # CloudStack's name is stored
    # The same VM by VMware id, the same network for test failover: a second mapping.
    status, _ = await admin.post("/network-mappings", {"vm_id": "4210-aaaa", "source_network_name": "VM Network",
                                                       "destination_network_id": test, "is_test_network": True})
    assert status == 201
    status, st = await admin.get("/network-mappings/4210-aaaa/status")
    assert st["data"]["live"]["mapped"] == ["VM Network"] and st["data"]["live"]["unmapped"] == ["Backup LAN"]
    assert st["data"]["test"]["mapped"] == ["VM Network"] and st["data"]["test_mappings"] == 1
    assert "1 source network(s) without a live mapping" in st["message"]

    # Saving the same source network and kind again replaces its destination.
    status, replaced = await admin.post("/network-mappings", {"vm_id": "ctx-db", "source_network_name": "Backup LAN",
                                                              "destination_network_id": test})
    assert status == 201 and "created" in replaced["message"]
    status, replaced = await admin.post("/network-mappings", {"vm_id": "ctx-db", "source_network_name": "Backup LAN",
                                                              "destination_network_id": prod})
    assert status == 201 and "updated" in replaced["message"]
    status, st = await admin.get("/network-mappings/ctx-db/status")
    assert st["data"]["mapping_complete"] is True and st["data"]["live"]["complete"] is True
    assert st["data"]["test"]["unmapped"] == ["Backup LAN"] and st["data"]["total_mappings"] == 3
    assert {x["source_network_name"]: x["destination_network_id"] for x in st["data"]["live"]["mappings"]} == \
        {"VM Network": prod, "Backup LAN": prod}

    status, mine = await admin.get("/network-mappings/ctx-db")
    assert status == 200 and len(mine["data"]) == 3
    status, everything = await admin.get("/network-mappings")
    assert status == 200 and everything["data"] == mine["data"]

    status, gone = await admin.delete("/network-mappings/ctx-db/VM Network?is_test_network=true")
    assert status == 200 and gone["deleted"] == 1
    assert (await admin.get("/network-mappings/ctx-db/status"))[1]["data"]["test"]["mapped"] == []
    status, gone = await admin.delete("/network-mappings/ctx-db/VM Network")
    assert status == 200 and gone["deleted"] == 1
    assert (await admin.delete("/network-mappings/ctx-db/VM Network"))[0] == 404
    assert [x["source_network_name"] for x in (await admin.get("/network-mappings/ctx-db"))[1]["data"]] == \
        ["Backup LAN"]


async def test_mappings_are_checked(admin: Api, cs: CloudStackSim) -> None:
    prod = net(cs, "prod-net")
    body = {"vm_id": "ctx-db", "source_network_name": "VM Network", "destination_network_id": prod}
    status, err = await admin.post("/network-mappings", {**body, "destination_network_id": "no-such-network"})
    assert status == 400 and "no-such-network" in err["details"]
    status, err = await admin.post("/network-mappings", {**body, "source_network_name": "DMZ"})
    assert status == 400 and err["source_networks"] == ["VM Network", "Backup LAN"]
    status, err = await admin.post("/network-mappings", {**body, "vm_id": "nobody"})
    assert status == 404 and "nobody" in err["details"]
    assert (await admin.post("/network-mappings", {**body, "vm_context_id": "ctx-other"}))[0] == 400
    assert (await admin.post("/network-mappings", {**body, "destination_network_id": "bad id"}))[0] == 400
    assert (await admin.post("/network-mappings", {"vm_id": "ctx-db"}))[0] == 400
    assert (await admin.get("/network-mappings/nobody"))[0] == 404
    assert (await admin.get("/network-mappings/nobody/status"))[0] == 404
    # CloudStack refusing the key is the appliance's error shape with CloudStack's text.
    cs.inv.accounts[next(iter(cs.inv.accounts))].secret_key = "rotated"
    status, err = await admin.post("/network-mappings", body)
    assert status == 503 and err["code"] == "cloudstack_unauthorized" and "unable to verify" in err["details"]


async def test_new_contexts_get_the_default_config(db: Database) -> None:
    async with db.transaction() as tx:
        await Contexts(db).create(tx, VmSpec(id="u-1", name="before"), vcenter_host="vc", datacenter="DC1",
                                  credential_id=None, auto_added=True)
        first = await ossea.create(tx, {"name": "a", "api_url": "http://a/client/api", "api_key": "k",
                                        "secret_key_sealed": "v1.x", "zone": "z", "oma_vm_id": "vm"},
                                   make_default=False, actor="t")
        second = await ossea.create(tx, {"name": "b", "api_url": "http://b/client/api", "api_key": "k",
                                         "secret_key_sealed": "v1.y", "zone": "z", "oma_vm_id": "vm"},
                                    make_default=False, actor="t")
        await Contexts(db).create(tx, VmSpec(id="u-2", name="after", networks=[NicSpec(network_name="n")]),
                                  vcenter_host="vc", datacenter="DC1", credential_id=None, auto_added=True)
        await ossea.set_default(tx, second)
        await Contexts(db).create(tx, VmSpec(id="u-3", name="later"), vcenter_host="vc", datacenter="DC1",
                                  credential_id=None, auto_added=True)
    rows = await db.fetchall("SELECT vm_name, ossea_config_id FROM vm_replication_contexts ORDER BY vmware_vm_id")
    assert [(r["vm_name"], r["ossea_config_id"]) for r in rows] == [("before", None), ("after", first),
                                                                    ("later", second)]
    assert (await ossea.default(db)) is not None and (await ossea.default(db)).id == second  # type: ignore[union-attr]
    assert await ossea.contexts_using(db, first) == 1

    # A VM context's mappings go with it.
    ref = await network_mappings.vm(db, "after")
    assert ref.networks == ("n",)
    async with db.transaction() as tx:
        await network_mappings.put(tx, ref, source="n", destination_id="x", destination_name="x", is_test=False,
                                   actor="t")
    assert len(await network_mappings.list_all(db)) == 1
    await db.execute("DELETE FROM vm_replication_contexts WHERE vm_name = 'after'")
    assert await network_mappings.list_all(db) == []
