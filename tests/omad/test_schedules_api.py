"""/schedules and /machine-groups on the real omad: validation errors that name the field, CRUD, membership,
a VM's groups, the VM list's groups and next_scheduled_at, and a manual run going through omad's scheduler."""

from __future__ import annotations

import asyncio
import pytest

from ..rig import Api, Stack

pytestmark = pytest.mark.timeout(90)

NIGHTLY = {"name": "nightly", "cron_expression": "0 30 2 * * *", "timezone": "Europe/Berlin"}


async def repository(stack: Stack, api: Api) -> str:
    """A local backup repository (schedules are checked against the real backup service)."""
    root = stack.state / "repositories" / "backups"  # inside nbd-pool's export roots of the stack
    root.mkdir(exist_ok=True)
    status, repo = await api.post("/repositories", {"name": "local", "type": "local",
                                                    "config": {"disk_path": str(root)}})
    assert status == 201, repo
    return str(repo["id"])


def seed_contexts(stack: Stack, names: list[str]) -> dict[str, str]:
    t = "2025-01-01T00:00:00.000Z"
    ids = {n: f"ctx-{n}-20250101-000000" for n in names}
    for i, (n, cid) in enumerate(ids.items()):
        stack.sql("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
                  "created_at, updated_at) VALUES (?, ?, ?, ?, 'vc.example.com', ?, ?)",
                  (cid, n, f"4210-{i}", f"/DC1/vm/{n}", t, t))
    return ids


INVALID = [
    ({"cron_expression": "0 61 2 * * *"}, "cron_expression", "the minute field (2nd of 6, '61')"),
    ({"cron_expression": "0 2 * *"}, "cron_expression", "4 fields"),
    ({"timezone": "Europe/Atlantis"}, "timezone", "not an IANA time zone"),
    ({"repository_id": None}, "repository_id", "needs a repository_id"),
    ({"repository_id": 999}, "repository_id", "backup repository '999' does not exist"),
    ({"max_concurrent_jobs": 0}, "max_concurrent_jobs", "must be >= 1"),
    ({"backup_type": "differential"}, "backup_type", "must be one of full, incremental, auto"),
    ({"name": None}, "name", "must not be null"),
]


async def test_invalid_schedules_are_400s_naming_the_field(stack: Stack, admin: Api) -> None:
    repo = await repository(stack, admin)
    for change, field, words in INVALID:
        body = {**NIGHTLY, "repository_id": repo, **change}
        status, err = await admin.post("/schedules", body)
        assert status == 400, err
        assert err["code"] == "invalid_request" and err["details"].startswith(f"{field}: ")
        assert words in err["details"], err
    assert (await admin.get("/schedules"))[1]["count"] == 0


async def test_schedule_crud(stack: Stack, admin: Api) -> None:
    repo = await repository(stack, admin)
    status, s = await admin.post("/schedules", {**NIGHTLY, "repository_id": repo})
    assert status == 201, s
    assert (s["cron_expression"], s["timezone"], s["enabled"], s["repository_id"]) == \
        ("0 30 2 * * *", "Europe/Berlin", True, repo)
    assert s["next_run_at"] and s["created_by"] == "admin" and s["groups"] == [] and s["last_execution"] is None
    assert (await admin.post("/schedules", {**NIGHTLY, "repository_id": repo}))[0] == 409
    status, one = await admin.get(f"/schedules/{s['id']}")
    assert status == 200 and len(one["upcoming_runs"]) == 5 and one["upcoming_runs"][0] == s["next_run_at"]
    status, changed = await admin.put(f"/schedules/{s['id']}", {"cron_expression": "15 3 * * *",
                                                                 "max_concurrent_jobs": 4})
    assert status == 200 and changed["cron_expression"] == "15 3 * * *" and changed["max_concurrent_jobs"] == 4
    assert changed["next_run_at"] != s["next_run_at"]
    assert (await admin.put(f"/schedules/{s['id']}", {"timezone": "Nowhere/Zone"}))[0] == 400
    status, off = await admin.post(f"/schedules/{s['id']}/enable", {"enabled": False})
    assert status == 200 and off["enabled"] is False and off["next_run_at"] is None
    status, on = await admin.post(f"/schedules/{s['id']}/enable")  # no body: enable
    assert status == 200 and on["enabled"] is True and on["next_run_at"]
    status, listing = await admin.get("/schedules")
    assert status == 200 and listing["count"] == 1 and listing["schedules"][0]["id"] == s["id"]
    assert (await admin.delete(f"/schedules/{s['id']}"))[0] == 200
    status, err = await admin.get(f"/schedules/{s['id']}")
    assert status == 404 and err["code"] == "not_found"


async def test_groups_membership_and_the_vm_list(stack: Stack, admin: Api) -> None:
    ids = seed_contexts(stack, ["web", "db", "spare"])
    s = (await admin.post("/schedules", {**NIGHTLY, "repository_id": await repository(stack, admin)}))[1]
    status, err = await admin.post("/machine-groups", {"name": "Gold", "schedule_id": "no-such-schedule"})
    assert status == 400 and err["details"].startswith("schedule_id: ")
    assert (await admin.post("/machine-groups", {"name": "Gold", "max_concurrent_vms": 101}))[0] == 400
    status, gold = await admin.post("/machine-groups", {"name": "Gold", "schedule_id": s["id"], "priority": 10,
                                                        "max_concurrent_vms": 2})
    assert status == 201 and gold["schedule_name"] == "nightly" and gold["vm_count"] == 0
    status, web = await admin.post("/machine-groups", {"name": "Web tier"})
    assert status == 201 and web["schedule_id"] is None

    status, err = await admin.post(f"/machine-groups/{gold['id']}/vms",
                                   {"vm_context_ids": [ids["web"], "ctx-nope"]})
    assert status == 400 and err["details"].startswith("vm_context_ids[1]: ")
    assert (await admin.post(f"/machine-groups/{gold['id']}/vms", {}))[0] == 400
    status, added = await admin.post(f"/machine-groups/{gold['id']}/vms",
                                     {"vm_context_ids": [ids["web"], ids["db"]], "priority": 5})
    assert status == 200 and added["added"] == [ids["web"], ids["db"]]
    status, again = await admin.post(f"/machine-groups/{gold['id']}/vms",
                                     {"vm_context_id": ids["db"], "priority": 1, "enabled": False})
    assert status == 200 and again["updated"] == [ids["db"]]
    status, members = await admin.get(f"/machine-groups/{gold['id']}/vms")
    assert status == 200 and [m["vm_name"] for m in members["vms"]] == ["db", "web"]
    assert members["vms"][0]["enabled"] is False
    assert members["vms"][1]["next_scheduled_at"] == s["next_run_at"]  # an enabled member of a scheduled group
    assert members["vms"][0]["next_scheduled_at"] is None  # disabled in the group

    status, vmg = await admin.put(f"/vm-contexts/{ids['web']}/group", {"group_ids": [gold["id"], web["id"]]})
    assert status == 200 and vmg["group_count"] == 2
    status, listing = await admin.get("/vm-contexts")
    items = {i["vm_name"]: i for i in listing["vm_contexts"]}
    assert items["web"]["group_count"] == 2 and {g["group_name"] for g in items["web"]["groups"]} == \
        {"Gold", "Web tier"}
    assert items["web"]["next_scheduled_at"] == s["next_run_at"] and "last_scheduled_job_id" in items["web"]
    status, err = await admin.put(f"/vm-contexts/{ids['spare']}/group", {"group_id": "no-such-group"})
    assert status == 400 and err["details"].startswith("group_id: ")
    assert (await admin.put("/vm-contexts/ctx-nope/group", {"group_id": gold["id"]}))[0] == 404
    status, vmg = await admin.put(f"/vm-contexts/{ids['web']}/group", {"group_id": None})
    assert status == 200 and vmg["group_count"] == 0
    status, ungrouped = await admin.get("/vm-contexts/ungrouped")
    assert {v["vm_name"] for v in ungrouped["vms"]} == {"web", "spare"}

    assert (await admin.delete(f"/machine-groups/{gold['id']}/vms/{ids['web']}"))[0] == 404  # not a member now
    assert (await admin.delete(f"/machine-groups/{gold['id']}/vms/{ids['db']}"))[0] == 200
    status, groups = await admin.get("/machine-groups")
    assert status == 200 and [g["name"] for g in groups["groups"]] == ["Gold", "Web tier"]
    assert (await admin.delete(f"/machine-groups/{gold['id']}"))[0] == 200
    assert (await admin.get(f"/machine-groups/{gold['id']}"))[0] == 404
    assert (await admin.get("/vm-contexts"))[1]["total"] == 3  # deleting groups keeps the VMs
    actions = {r[0] for r in stack.sql("SELECT action FROM audit_log")}
    assert {"schedule.create", "machine_group.create", "machine_group.add_vms", "vm_context.set_groups",
            "machine_group.remove_vm", "machine_group.delete"} <= actions


async def test_a_manual_run_goes_through_omads_scheduler(stack: Stack, admin: Api) -> None:
    ids = seed_contexts(stack, ["web", "db"])
    repo = await repository(stack, admin)
    s = (await admin.post("/schedules", {**NIGHTLY, "repository_id": repo, "retry_attempts": 0}))[1]
    g = (await admin.post("/machine-groups", {"name": "Gold", "schedule_id": s["id"]}))[1]
    await admin.post(f"/machine-groups/{g['id']}/vms", {"vm_context_ids": list(ids.values())})
    status, run = await admin.post(f"/schedules/{s['id']}/trigger")
    assert status == 202 and run["status"] == "running" and run["triggered_by"] == "manual:admin"
    assert run["vms_eligible"] == 2
    for _ in range(200):  # omad's scheduler loop was woken by the trigger
        page = (await admin.get(f"/schedules/{s['id']}/executions"))[1]
        if page["executions"][0]["status"] != "running":
            break
        await asyncio.sleep(0.05)
    done = page["executions"][0]
    # The backup service refuses these VMs (seeded without disks): each refusal is recorded with its reason.
    assert (done["status"], done["jobs_created"], done["start_failures"]) == ("failed", 0, 2)
    status, detail = await admin.get(f"/schedules/{s['id']}/executions/{done['id']}")
    assert status == 200 and all("VM has no disks" in v["reason"] for v in detail["vms"]), detail
    status, page = await admin.get(f"/schedules/{s['id']}/executions", params={"limit": "1", "status": "failed"})
    assert status == 200 and (page["count"], page["total"]) == (1, 1)
    assert (await admin.get(f"/schedules/{s['id']}/executions", params={"status": "bogus"}))[0] == 400
    assert (await admin.get(f"/schedules/{s['id']}/executions/abc"))[0] == 400
    assert (await admin.post("/schedules/no-such-id/trigger"))[0] == 404


REPLICATION_INVALID = [
    ({"replication_type": "differential"}, "replication_type", "must be one of full, incremental, auto"),
    ({"action": "copy"}, "action", "must be one of backup, replication"),
    ({"repository_id": "1"}, "repository_id", "a replication schedule writes into CloudStack volumes"),
    ({"policy_id": 3}, "policy_id", "a replication schedule writes into CloudStack volumes"),
    ({"max_concurrent_jobs": 1001}, "max_concurrent_jobs", "must be <= 1000"),
    ({"retry_attempts": 11}, "retry_attempts", "must be <= 10"),
    ({"retry_delay_minutes": -1}, "retry_delay_minutes", "must be >= 0"),
]


async def test_replication_schedules_are_validated(stack: Stack, admin: Api) -> None:
    body = {**NIGHTLY, "action": "replication"}
    for change, field, words in REPLICATION_INVALID:
        status, err = await admin.post("/schedules", {**body, **change})
        assert status == 400, (change, err)
        assert err["code"] == "invalid_request" and err["details"].startswith(f"{field}: "), err
        assert words in err["details"], err
    assert (await admin.get("/schedules"))[1]["count"] == 0
    status, s = await admin.post("/schedules", body)  # no replication_type: detected per VM
    assert status == 201 and (s["action"], s["replication_type"], s["repository_id"]) == ("replication", "auto", None)
    status, contract = await admin.post("/schedules", {**NIGHTLY, "name": "contract", "replication_type": "full"})
    assert status == 201 and (contract["action"], contract["replication_type"]) == ("replication", "full"), contract
    status, changed = await admin.put(f"/schedules/{s['id']}", {"replication_type": "incremental"})
    assert status == 200 and changed["replication_type"] == "incremental"
    assert (await admin.put(f"/schedules/{s['id']}", {"replication_type": "sometimes"}))[0] == 400
    assert (await admin.put(f"/schedules/{s['id']}", {"repository_id": "1"}))[0] == 400
    repo = await repository(stack, admin)
    status, backup = await admin.put(f"/schedules/{s['id']}", {"action": "backup", "repository_id": repo})
    assert status == 200 and (backup["action"], backup["repository_id"]) == ("backup", repo), backup
    status, err = await admin.put(f"/schedules/{s['id']}", {"action": "replication"})
    assert status == 400 and err["details"].startswith("repository_id: ")
    status, back = await admin.put(f"/schedules/{s['id']}", {"action": "replication", "repository_id": ""})
    assert status == 200 and (back["action"], back["repository_id"]) == ("replication", None)
