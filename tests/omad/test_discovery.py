"""Discovery through the VMA simulator, end to end through the real daemons: discover, add, list, get."""

from __future__ import annotations

import json
import socket
from urllib.parse import quote

import pytest

from tests.sim.vma import GiB, MiB, VMASim

from ..rig import Api, Stack
from .conftest import ODD_NAMES, PASSWORD, USER, VCENTER, manual, vma_config

pytestmark = pytest.mark.timeout(120)

DISK_FIELDS = ("label", "path", "vmdk_path", "size_gb", "capacity_bytes", "datastore", "provisioning_type",
               "unit_number")
NIC_FIELDS = ("label", "network_name", "adapter_type", "mac_address", "connected", "type")


def by_name(path: str) -> str:
    """The URL path of one VM's context: the name percent-encoded, '/' included."""
    return f"/vm-contexts/{quote(path, safe='')}"


def counts(stack: Stack) -> tuple[int, ...]:
    return tuple(stack.sql(f"SELECT COUNT(*) FROM {t}")[0][0]  # noqa: S608 - fixed table names
                 for t in ("vm_replication_contexts", "vm_disks", "vm_networks", "vm_inventory"))


async def test_discover_add_list_get_reproduce_the_contract(vstack: Stack, api: Api, vma: VMASim) -> None:
    truth = {vm["name"]: vm for vm in vma.state.inventory.discovery()["vms"]}
    status, found = await api.post("/discovery/discover-vms", manual())
    assert status == 200, found
    assert found["discovery_count"] == 3 and found["status"] == "success"
    assert [vm["name"] for vm in found["discovered_vms"]] == ODD_NAMES
    for vm in found["discovered_vms"]:
        assert (vm["existing"], vm["context_id"]) == (False, None)
        assert {k: vm[k] for k in truth[vm["name"]]} == truth[vm["name"]]  # every field of the VMA passed on
    assert counts(vstack)[:3] == (0, 0, 0)  # discovery alone adds nothing to management

    status, added = await api.post("/discovery/add-vms", {**manual(), "vm_names": ODD_NAMES, "added_by": "olga"})
    assert status == 200, added
    assert (added["success"], added["vms_added"], added["vms_failed"], added["total_vms"]) == (True, 3, 0, 3)
    ids = {p["vm_name"]: p["context_id"] for p in added["processed_vms"]}
    assert all(p["success"] for p in added["processed_vms"]) and len(set(ids.values())) == 3
    assert all(cid.startswith("ctx-") and "/" not in cid and len(cid) < 100 for cid in ids.values())

    status, listing = await api.get("/vm-contexts")
    assert status == 200 and listing["count"] == 3 and listing["total"] == 3
    for item in listing["vm_contexts"]:
        vm = truth[item["vm_name"]]
        assert item["context_id"] == ids[item["vm_name"]]
        assert (item["groups"], item["group_count"]) == ([], 0)
        assert item["current_status"] == "discovered" and item["auto_added"] is True
        assert item["scheduler_enabled"] is True
        assert (item["vmware_vm_id"], item["vm_path"], item["vcenter_host"], item["datacenter"]) == \
            (vm["id"], vm["path"], VCENTER, "DC1")
        assert (item["cpu_count"], item["memory_mb"], item["os_type"], item["power_state"],
                item["vm_tools_version"]) == (vm["num_cpu"], vm["memory_mb"], vm["os_type"], vm["power_state"],
                                              vm["vmware_tools_version"])
        assert item["total_jobs_run"] == 0 and item["current_job_id"] is None and item["credential_id"] is None

    for name in ODD_NAMES:
        vm = truth[name]
        status, detail = await api.get(by_name(name))
        assert status == 200, (name, detail)
        assert detail["context"]["vm_name"] == name and detail["context"]["context_id"] == ids[name]
        assert (detail["current_job"], detail["job_history"], detail["cbt_history"], detail["last_operation"]) == \
            (None, [], [], None)
        assert [{"id": d["disk_id"], **{f: d[f] for f in DISK_FIELDS}} for d in detail["disks"]] == vm["disks"]
        assert all(d["disk_change_id"] is None for d in detail["disks"])
        assert [{f: n[f] for f in NIC_FIELDS} for n in detail["networks"]] == vm["networks"]
        status, recent = await api.get(f"/vm-contexts/{quote(ids[name], safe='')}/recent-jobs")
        assert status == 200 and (recent["jobs"], recent["count"], recent["vm_name"]) == ([], 0, name)

    status, found = await api.post("/discovery/discover-vms", manual())
    assert all(vm["existing"] and vm["context_id"] == ids[vm["name"]] and vm["changes"] == []
               for vm in found["discovered_vms"])
    audit = vstack.sql("SELECT actor, resource, details FROM audit_log WHERE action = 'vm_context.create'")
    assert sorted(r for _, r, _ in audit) == sorted(f"vm_context:{c}" for c in ids.values())
    # The trail names who called; the body's added_by is the client's label, kept beside it.
    assert {(a, json.loads(d)["added_by"]) for a, _, d in audit} == {("admin", "olga")}


async def test_adding_twice_creates_nothing(vstack: Stack, api: Api) -> None:
    assert (await api.post("/discovery/add-vms", {**manual(), "vm_names": ODD_NAMES[:2]}))[1]["vms_added"] == 2
    before = counts(vstack)
    status, again = await api.post("/discovery/add-vms", {**manual(), "vm_names": ODD_NAMES[:2] + ["ghost"]})
    assert status == 200
    assert (again["success"], again["vms_added"], again["vms_existing"], again["vms_failed"]) == (False, 0, 2, 1)
    assert [(p["vm_name"], p["success"], p.get("existing")) for p in again["processed_vms"]] == \
        [(ODD_NAMES[0], True, True), (ODD_NAMES[1], True, True), ("ghost", False, None)]
    assert "no VM named 'ghost'" in again["processed_vms"][2]["error"]
    assert counts(vstack) == before
    status, result = await api.post("/discovery/bulk-add", {**manual(), "selected_vms": ODD_NAMES})
    assert status == 200
    assert (result["total_requested"], result["successfully_added"], result["skipped"], result["failed"]) == (3, 1, 2, 0)
    assert [v["vm_name"] for v in result["added_vms"]] == [ODD_NAMES[2]]
    assert {v["vm_name"] for v in result["skipped_vms"]} == set(ODD_NAMES[:2])
    assert counts(vstack)[0] == 3
    audit = vstack.sql("SELECT resource FROM audit_log WHERE action = 'vm_context.create' ORDER BY id")
    assert [r for (r,) in audit][-1] == f"vm_context:{result['added_vms'][0]['context_id']}" and len(audit) == 3


async def test_rediscovery_updates_changed_specs_and_says_so(vstack: Stack, api: Api, vma: VMASim) -> None:
    added = (await api.post("/discovery/add-vms", {**manual(), "vm_names": ODD_NAMES}))[1]
    web = ODD_NAMES[0]
    cid = added["processed_vms"][0]["context_id"]
    vstack.sql("UPDATE vm_disks SET disk_change_id = 'cbt-1/1' WHERE vm_context_id = ? AND disk_id = 'disk-2000'",
               (cid,))
    vma.state.add_disk(web, 2 * GiB, datastore="ssd")
    vma.state.resize_disk(web, "disk-2000", 128 * MiB)
    vma.state.vm(web).memory_mb = 4096
    vma.state.vm(web).networks[1].network_name = "DMZ"
    vma.state.set_power_state(web, "poweredOff")

    status, found = await api.post("/discovery/discover-vms", manual())
    assert status == 200
    item = next(vm for vm in found["discovered_vms"] if vm["name"] == web)
    assert item["existing"] and item["updated"] and item["context_id"] == cid
    text = "; ".join(item["changes"])
    assert "disk disk-2002 added (2 GiB)" in text and "disk disk-2000 resized from 0.0625 GiB to 0.125 GiB" in text
    assert "memory (MB) changed from 2048 to 4096" in text and "network adapters changed" in text
    assert "power" not in text  # updated, not reported
    assert all(vm["changes"] == [] for vm in found["discovered_vms"] if vm["name"] != web)

    detail = (await api.get(by_name(web)))[1]
    disks = {d["disk_id"]: d for d in detail["disks"]}
    assert sorted(disks) == ["disk-2000", "disk-2001", "disk-2002"]
    assert disks["disk-2000"]["capacity_bytes"] == 128 * MiB and disks["disk-2000"]["disk_change_id"] == "cbt-1/1"
    assert disks["disk-2002"]["datastore"] == "ssd"
    assert detail["context"]["memory_mb"] == 4096 and detail["context"]["power_state"] == "poweredOff"
    assert [n["network_name"] for n in detail["networks"]] == ["VM Network", "DMZ"]

    vma.state.vm(web).disks.pop()  # the disk goes away again
    item = next(vm for vm in (await api.post("/discovery/discover-vms", manual()))[1]["discovered_vms"]
                if vm["name"] == web)
    assert item["changes"] == ["disk disk-2002 removed"]
    assert len((await api.get(by_name(web)))[1]["disks"]) == 2


async def test_create_context_with_selected_vms_and_preview(vstack: Stack, api: Api) -> None:
    status, preview = await api.post("/discovery/preview", manual(filter="web"))
    assert status == 200 and preview["total_discovered"] == 1 and preview["new_vms"] == 1
    assert preview["filter"] == "web" and preview["vms"][0]["name"] == ODD_NAMES[0]
    assert counts(vstack) == (0, 0, 0, 0)  # a preview writes nothing

    status, found = await api.post("/discovery/discover-vms", {**manual(), "create_context": True,
                                                               "selected_vms": [ODD_NAMES[1], "nope"]})
    assert status == 200
    result = found["addition_result"]
    assert (result["successfully_added"], result["failed"]) == (1, 1)
    assert [vm["name"] for vm in found["discovered_vms"] if vm.get("added")] == [ODD_NAMES[1]]
    assert counts(vstack)[0] == 1 and counts(vstack)[3] == 3  # the inventory knows all three
    status, preview = await api.post("/discovery/preview", manual())
    assert (preview["new_vms"], preview["existing_vms"]) == (2, 1)

    status, found = await api.post("/discovery/discover-vms", {**manual(), "create_context": True})
    assert found["addition_result"]["successfully_added"] == 2 and counts(vstack)[0] == 3
    audit = vstack.sql("SELECT actor, resource FROM audit_log WHERE action = 'vm_context.create'")
    assert sorted(audit) == sorted(("admin", f"vm_context:{vm['context_id']}") for vm in found["discovered_vms"])


async def test_saved_and_default_credentials(vstack: Stack, api: Api) -> None:
    status, err = await api.post("/discovery/discover-vms", {})
    assert status == 400 and "no default VMware credential" in err["details"]
    status, err = await api.post("/discovery/discover-vms", {"vcenter": VCENTER, "username": USER})
    assert status == 400 and "password" in err["details"]
    cred = (await api.post("/vmware-credentials", {"credential_name": "sim", "vcenter_host": VCENTER,
                                                   "username": USER, "password": PASSWORD,
                                                   "datacenter": "DC1"}))[1]
    status, found = await api.post("/discovery/discover-vms", {"credential_id": cred["id"]})
    assert status == 200 and found["discovery_count"] == 3
    status, added = await api.post("/discovery/add-vms", {"credential_id": cred["id"], "vm_names": [ODD_NAMES[0]]})
    assert status == 200 and added["vms_added"] == 1
    context = (await api.get(by_name(ODD_NAMES[0])))[1]["context"]
    assert context["credential_id"] == cred["id"]
    used = (await api.get(f"/vmware-credentials/{cred['id']}"))[1]
    assert used["usage_count"] == 2 and used["last_used"]
    await api.put(f"/vmware-credentials/{cred['id']}/set-default")
    status, found = await api.post("/discovery/discover-vms", {})  # nothing given: the default
    assert status == 200 and found["discovered_vms"][0]["existing"] is True
    assert (await api.post("/discovery/discover-vms", {"credential_id": 999}))[0] == 404
    assert (await api.delete(f"/vmware-credentials/{cred['id']}"))[0] == 409  # a context uses it


async def test_wrong_vcenter_login_is_the_vmas_text(vstack: Stack, api: Api) -> None:
    status, err = await api.post("/discovery/discover-vms", manual(password="wrong"))
    assert status == 503 and err["code"] == "unavailable" and err["vma_status"] == 500
    assert "incorrect user name or password" in err["error"]
    assert counts(vstack) == (0, 0, 0, 0)


@pytest.mark.parametrize("fault, status, fragment", [
    ("slow", 504, "did not answer"),
    ("garbage", 503, "malformed JSON"),
    ("unusable", 503, "unusable discovery answer"),
    ("error", 503, "vCenter session expired"),
    ("dropped", 503, "VMA unreachable"),
])
async def test_vma_failures_are_503_504_and_write_nothing(vstack: Stack, api: Api, vma: VMASim, fault: str,
                                                          status: int, fragment: str) -> None:
    await api.post("/discovery/add-vms", {**manual(), "vm_names": [ODD_NAMES[0]]})
    vma.state.vm(ODD_NAMES[0]).memory_mb = 1  # a change that must not be written
    before = counts(vstack), vstack.sql("SELECT COUNT(*) FROM audit_log")
    faults = vma.state.faults
    if fault == "slow":
        faults.delay("discover", 10)
    elif fault == "garbage":
        faults.malformed("discover")
    elif fault == "unusable":
        faults.malformed("discover", body='{"vcenter": {}, "vms": [{"id": "x", "name": "", "disks": 3}]}')
    elif fault == "error":
        faults.error("discover", 500, "vCenter session expired\n")
    else:
        faults.drop("discover")
    for path, extra in (("/discovery/discover-vms", {}), ("/discovery/add-vms", {"vm_names": ODD_NAMES}),
                        ("/discovery/preview", {}), ("/discovery/bulk-add", {"selected_vms": ODD_NAMES})):
        got, err = await api.post(path, {**manual(), **extra})
        assert got == status, (path, err)
        assert set(err) >= {"error", "details", "code", "timestamp"} and fragment in err["error"] + err["details"]
    assert (counts(vstack), vstack.sql("SELECT COUNT(*) FROM audit_log")) == before
    assert vstack.sql("SELECT memory_mb FROM vm_replication_contexts") == [(2048,)]


async def test_vma_down_is_503(stack_config: Stack) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stack_config.add_config("omad", "50-vma.toml", vma_config(f"http://127.0.0.1:{port}"))
    stack_config.start()
    async with Api(stack_config.url) as api:
        await api.login("admin", stack_config.admin_password)
        status, err = await api.post("/discovery/discover-vms", manual())
        assert status == 503 and err["error"] == "VMA unreachable" and f"127.0.0.1:{port}" in err["details"]
    assert stack_config.sql("SELECT COUNT(*) FROM vm_inventory") == [(0,)]


async def test_odd_names_work_end_to_end(vstack: Stack, api: Api, vma: VMASim) -> None:
    vma.state.add_vm("ungrouped", disks=1, nics=0)  # the name of the alias route
    vma.state.add_vm("50% off & more?#", disks=1, nics=1)
    vma.state.add_vm("web 01/recent-jobs", disks=1, nics=1)
    names = ODD_NAMES + ["50% off & more?#", "web 01/recent-jobs"]
    status, added = await api.post("/discovery/add-vms", {**manual(), "vm_names": names + ["ungrouped"]})
    assert status == 200 and added["vms_added"] == 6, added
    for name in names:
        status, detail = await api.get(by_name(name))
        assert status == 200 and detail["context"]["vm_name"] == name, (name, detail)
    assert len(ODD_NAMES[2]) > 200
    # A name sent with a raw '/' is two path segments: not found, never another VM.
    assert (await api.get("/vm-contexts/db/primary – ünïcödé"))[0] == 404
    assert (await api.get(by_name("db/primary")))[0] == 404
    # /vm-contexts/ungrouped is the spec's alias; the VM of that name is found through the list.
    status, alias = await api.get("/vm-contexts/ungrouped")
    assert status == 200 and alias["count"] == 6 and "vms" in alias
    assert (await api.get("/discovery/ungrouped-vms"))[1]["count"] == 6
    listing = (await api.get("/vm-contexts"))[1]["vm_contexts"]
    assert sorted(i["vm_name"] for i in listing) == sorted(names + ["ungrouped"])



async def test_a_pinned_credential_sends_its_pin_to_the_vma(vstack: Stack, api: Api, vma: VMASim) -> None:
    pin = ":".join(["0F"] * 32)
    pinned = (await api.post("/vmware-credentials", {"credential_name": "pinned", "vcenter_host": VCENTER,
                                                     "username": USER, "password": PASSWORD, "datacenter": "DC1",
                                                     "tls_thumbprint": pin}))[1]
    plain = (await api.post("/vmware-credentials", {"credential_name": "plain", "vcenter_host": VCENTER,
                                                    "username": USER, "password": PASSWORD}))[1]
    for cred in (pinned, plain):
        assert (await api.post("/discovery/discover-vms", {"credential_id": cred["id"]}))[0] == 200
    sent = [r.json for r in vma.state.requests if r.path.endswith("/discover")]
    assert [b.get("vcenter_thumbprint") for b in sent] == [pin, None]
