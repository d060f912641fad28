"""The audit trail covers the API: every mutating route of a running omad's OpenAPI document is either audited or
exempt for a stated reason (a new route fails here until someone decides), and the administrative routes,
exercised here on the real daemons, each leave an entry with the right action, actor and target."""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.sim.cloudstack import CloudStackSim, running

from ..nbd_pool.helpers import sh
from ..rig import ROOT, Api, Stack, make_stack
from .backup.conftest import kill_strays
from .enrollment_rig import VmaKey, verified

pytestmark = pytest.mark.timeout(120)

HERE = "here"  # exercised by test_administrative_routes_leave_an_audit_entry below


@dataclass(frozen=True)
class Elsewhere:
    """Exercised by a heavier test (replication, failover, backup simulators) that asserts the entry itself:
    `shows` are texts of that test's body: how it calls the route, and how it checks the action (the
    /admin/vma/audit events drop "vma.")."""

    test: str  # path::function
    shows: tuple[str, ...]


# (method, path as in the document) → (action, where it is shown to be recorded).
AUDITED: dict[tuple[str, str], tuple[str, str | Elsewhere]] = {
    ("POST", "/auth/login"): ("auth.login", HERE),  # refusals too: outcome "denied" (tests/omad/test_auth.py)
    ("POST", "/auth/logout"): ("auth.logout", HERE),
    ("POST", "/vmware-credentials"): ("vmware_credential.create", HERE),
    ("PUT", "/vmware-credentials/{credential_id}"): ("vmware_credential.update", HERE),
    ("PUT", "/vmware-credentials/{credential_id}/set-default"): ("vmware_credential.set_default", HERE),
    ("POST", "/vmware-credentials/{credential_id}/set-default"): ("vmware_credential.set_default", HERE),
    ("DELETE", "/vmware-credentials/{credential_id}"): ("vmware_credential.delete", HERE),
    ("POST", "/machine-groups"): ("machine_group.create", HERE),
    ("PUT", "/machine-groups/{group_id}"): ("machine_group.update", HERE),
    ("POST", "/machine-groups/{group_id}/vms"): ("machine_group.add_vms", HERE),
    ("DELETE", "/machine-groups/{group_id}/vms/{vm_context_id}"): ("machine_group.remove_vm", HERE),
    ("PUT", "/vm-contexts/{context_id}/group"): ("vm_context.set_groups", HERE),
    ("DELETE", "/machine-groups/{group_id}"): ("machine_group.delete", HERE),
    ("POST", "/repositories"): ("repository.create", HERE),
    ("DELETE", "/repositories/{repository_id}"): ("repository.delete", HERE),
    ("POST", "/policies"): ("policy.create", HERE),
    ("POST", "/policies/{policy_id}/prune"): ("policy.prune", HERE),
    ("DELETE", "/policies/{policy_id}"): ("policy.delete", HERE),
    ("POST", "/schedules"): ("schedule.create", HERE),
    ("PUT", "/schedules/{schedule_id}"): ("schedule.update", HERE),
    ("POST", "/schedules/{schedule_id}/enable"): ("schedule.disable", HERE),  # or schedule.enable
    ("POST", "/schedules/{schedule_id}/trigger"): ("schedule.trigger", HERE),
    ("DELETE", "/schedules/{schedule_id}"): ("schedule.delete", HERE),
    # The envelope's create, update and delete; its get and test only read (no entry).
    ("POST", "/ossea/config"): ("ossea_config.create", HERE),
    ("POST", "/ossea/config-streamlined"): ("ossea_config.create", HERE),  # ossea_config.update when it exists
    ("POST", "/network-mappings"): ("network_mapping.put", HERE),
    ("DELETE", "/network-mappings/{vm_id}/{source_network_name}"): ("network_mapping.delete", HERE),
    ("POST", "/nbd/ports/allocate"): ("nbd.ports.allocate", HERE),
    ("POST", "/nbd/qemu-nbd/start"): ("nbd.export.start", HERE),  # a refused start too, outcome "failed"
    ("POST", "/nbd/qemu-nbd/stop"): ("nbd.export.stop", HERE),
    ("POST", "/nbd/ports/release"): ("nbd.ports.release", HERE),
    ("POST", "/admin/vma/pairing-code"): ("vma.pairing_code.create", HERE),
    ("POST", "/admin/vma/reject/{enrollment_id}"): ("vma.reject", HERE),
    # The VMA's public enrollment calls: not an administrator's, but who asked to be trusted is in the trail,
    # refusals too (outcome "denied").
    ("POST", "/vma/enroll"): ("vma.enroll", HERE),
    ("POST", "/vma/enroll/verify"): ("vma.verify", HERE),
    ("POST", "/admin/vma/approve/{enrollment_id}"): ("vma.approve", Elsewhere(
        "tests/omad/test_vma_enrollment.py::test_the_audit_log_holds_every_step_with_who_did_it",
        ("approved(admin, anon", '("approve", "admin", "ok")'))),
    ("DELETE", "/admin/vma/revoke/{enrollment_id}"): ("vma.revoke", Elsewhere(
        "tests/omad/test_vma_enrollment.py::test_the_audit_log_holds_every_step_with_who_did_it",
        ('admin.delete(f"/admin/vma/revoke/', '("revoke", "admin", "ok")'))),
    # Discovery writes an entry per VM it adds to management (discover-vms only with create_context); refreshing
    # the inventory of VMs already managed is vCenter's truth copied in, not an administrator's change.
    ("POST", "/discovery/add-vms"): ("vm_context.create", Elsewhere(
        "tests/omad/test_discovery.py::test_discover_add_list_get_reproduce_the_contract",
        ('"/discovery/add-vms"', "action = 'vm_context.create'"))),
    ("POST", "/discovery/discover-vms"): ("vm_context.create", Elsewhere(
        "tests/omad/test_discovery.py::test_create_context_with_selected_vms_and_preview",
        ('"create_context": True', "action = 'vm_context.create'"))),
    ("POST", "/discovery/bulk-add"): ("vm_context.create", Elsewhere(
        "tests/omad/test_discovery.py::test_adding_twice_creates_nothing",
        ('"/discovery/bulk-add"', "action = 'vm_context.create'"))),
    # Backups, copies, locks and restore mounts need the VMA simulator writing real images (and root): their own
    # tests check the entry.
    ("POST", "/backups"): ("backup.start", Elsewhere(
        "tests/omad/backup/test_backups.py::test_delete_from_the_newest_end",
        ("rig.backup(", '["backup.start"] * 3'))),
    ("DELETE", "/backups/{backup_id}"): ("backup.delete", Elsewhere(
        "tests/omad/backup/test_backups.py::test_delete_from_the_newest_end",
        ('rig.api.delete(f"/backups/', '["backup.delete"] * 3'))),
    ("POST", "/backups/{backup_id}/copy"): ("backup.copy", Elsewhere(
        "tests/omad/backup/test_policies.py::test_two_copy_rules_copy_chains_that_restore_and_verify",
        ('rig.api.post(f"/backups/{copy_id}/copy"', "action = 'backup.copy'"))),
    ("POST", "/backups/{backup_id}/lock"): ("backup.lock", Elsewhere(
        "tests/omad/backup/test_immutability.py::test_locked_backups_resist_root_and_early_deletion",
        ('rig.api.post(f"/backups/{top}/lock"', "action = 'backup.lock'"))),
    ("POST", "/restore/mount"): ("restore.mount", Elsewhere(
        "tests/omad/backup/test_restore.py::test_restore_files_from_a_full_and_an_incremental",
        ("await mount(rig", '"restore.mount"'))),
    ("DELETE", "/restore/{mount_id}"): ("restore.unmount", Elsewhere(
        "tests/omad/backup/test_restore.py::test_restore_files_from_a_full_and_an_incremental",
        ('rig.api.delete(f"/restore/', '"restore.unmount"'))),
    # Replication needs CloudStack volumes and the VMA; failover a whole CloudStack: their tests check it.
    ("POST", "/replications"): ("replication.start", Elsewhere(
        "tests/omad/test_replication.py::test_initial_then_incremental_writes_only_changed_blocks",
        ("await rig.sync()", '"replication.start"'))),
    ("PUT", "/replications/{job_id}"): ("replication.update", Elsewhere(
        "tests/omad/test_replication.py::test_initial_then_incremental_writes_only_changed_blocks",
        ('rig.api.put(f"/replications/', '"replication.update"'))),
    ("DELETE", "/replications/{job_id}"): ("replication.delete", Elsewhere(  # replication.cancel while it runs
        "tests/omad/test_replication.py::test_initial_then_incremental_writes_only_changed_blocks",
        ('rig.api.delete(f"/replications/', '"replication.delete"'))),
    ("POST", "/failover/test"): ("failover.failover", Elsewhere(
        "tests/omad/test_failover.py::test_test_failover_boots_the_replica_and_end_test_restores_it",
        ("fo.start_test()", '"failover.failover"'))),
    ("DELETE", "/failover/test/{job_id}"): ("failover.end_test", Elsewhere(
        "tests/omad/test_failover.py::test_test_failover_boots_the_replica_and_end_test_restores_it",
        ("fo.end_test(job_id)", '"failover.end_test", f"job:{end_id}"'))),
    ("POST", "/failover/cleanup/{vm_name}"): ("failover.end_test", Elsewhere(
        "tests/omad/test_failover.py::test_test_failover_boots_the_replica_and_end_test_restores_it",
        ('fo.rig.api.post(f"/failover/cleanup/{VM}")', '"failover.end_test", f"job:{body[\'job_id\']}"'))),
    ("POST", "/failover/{vm_name}/cleanup-failed"): ("failover.rollback", Elsewhere(
        "tests/omad/test_failover.py::test_a_failed_undo_leaves_cleanup_required_and_cleanup_failed_clears_it",
        ('fo.rig.api.post(f"/failover/{VM}/cleanup-failed")', "action = 'failover.rollback'"))),
    ("POST", "/failover/live"): ("failover.failover", Elsewhere(
        "tests/omad/test_failover_live.py::test_omad_killed_during_live_failover_and_rollback_finishes_them",
        ("start_live(rig)", "action = 'failover.failover'"))),
    ("POST", "/failover/rollback"): ("failover.rollback", Elsewhere(
        "tests/omad/test_failover_live.py::test_live_failover_powers_off_syncs_last_changes_and_rolls_back",
        ("roll_back(rig)", '"failover.rollback"'))),
    ("POST", "/failover/unified"): ("failover.failover", Elsewhere(
        "tests/omad/test_failover_live.py::test_live_failover_powers_off_syncs_last_changes_and_rolls_back",
        ('rig.api.post("/failover/unified"', '"failover.failover"'))),
}

# (method, path) → why no entry is written.
EXEMPT: dict[tuple[str, str], str] = {
    # The VMA's machine callbacks (CONTRACTS.md "Authentication": tokenless from its tunnel): progress of work an
    # administrator started, which is audited where it started.
    ("POST", "/backups/{backup_id}/complete"): "VMA callback: a disk of a backup is written",
    ("POST", "/replications/{job_id}/changeid"): "VMA callback: a disk's CBT change id",
    ("POST", "/telemetry/{job_type}/{job_id}"): "VMA callback: a job's progress",
    ("POST", "/vms/inventory"): "the VMA pushing its view of a vCenter (OMA-API.md: VM.ReceiveInventory)",
    # Reads and checks that happen to be POSTs: nothing an administrator manages changes.
    ("POST", "/discovery/preview"): "what a discovery would find; writes nothing",
    ("POST", "/failover/preflight/validate"): "a readiness check",
    ("POST", "/networks/resolve"): "a CloudStack network name to its id",
    ("POST", "/ossea/discover-resources"): "lists what a CloudStack key may use",
    ("POST", "/repositories/test"): "tries a repository's settings without saving them",
    ("POST", "/settings/cloudstack/detect-oma-vm"): "finds this appliance's VM in CloudStack",
    ("POST", "/settings/cloudstack/discover-all"): "lists what a CloudStack key may use",
    ("POST", "/settings/cloudstack/test-connection"): "tries CloudStack credentials",
    ("POST", "/settings/cloudstack/validate"): "checks configured CloudStack ids exist",
    ("POST", "/vmware-credentials/{credential_id}/test"): "tries a saved vCenter login",
    ("POST", "/backups/{backup_id}/verify"): "reads a backup's images and records only their verdict, as the "
                                             "scheduled verification does",
}

MUTATING = ("post", "put", "patch", "delete")


@dataclass
class Rig:
    stack: Stack
    cs: CloudStackSim


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """The four daemons and a CloudStack simulator, fresh for this module."""
    d = Path(tempfile.mkdtemp(prefix="oma-", dir="/tmp"))
    try:
        with running(d / "cs", d / "by-id") as cs:
            stack = make_stack(d / "stack")
            stack.add_config("omad", "50-cloudstack.toml", "[cloudstack]\ntimeout_seconds = 5\n")
            try:
                stack.start()
                yield Rig(stack, cs)
            finally:
                stack.stop()
                kill_strays(d)  # nbd-pool leaves its exports running: the test's, if it failed before stopping it
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def mutating_routes(stack: Stack) -> set[tuple[str, str]]:
    async with Api(stack.url) as anon:
        status, doc = await anon.get("/openapi.json")
    assert status == 200, doc
    prefix = "/api/v1"
    return {(m.upper(), path.removeprefix(prefix)) for path, ops in doc["paths"].items() for m in ops
            if m in MUTATING}


def source_of(ref: str) -> str:
    path, name = ref.split("::")
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.AsyncFunctionDef, ast.FunctionDef)) and node.name == name:
            return ast.get_source_segment((ROOT / path).read_text(), node) or ""
    raise AssertionError(f"{ref}: no such test")


async def test_every_mutating_route_is_audited_or_exempt(rig: Rig) -> None:
    routes = await mutating_routes(rig.stack)
    assert not set(AUDITED) & set(EXEMPT)
    undecided = sorted(routes - set(AUDITED) - set(EXEMPT))
    assert not undecided, ("mutating routes neither audited nor exempt (record an audit entry in the route's "
                           f"service, or add it to EXEMPT with the reason): {undecided}")
    stale = sorted((set(AUDITED) | set(EXEMPT)) - routes)
    assert not stale, f"listed but not served: {stale}"
    for route, (action, where) in AUDITED.items():
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", action), (route, action)
        if isinstance(where, Elsewhere):  # that test really calls the route and checks the entry
            body = source_of(where.test)
            assert all(text in body for text in where.shows), (route, where)


class Trail:
    """Calls a route and checks the entries it added to the audit log."""

    def __init__(self, stack: Stack, api: Api) -> None:
        self.stack = stack
        self.api = api
        self.exercised: set[tuple[str, str]] = set()

    def last_id(self) -> int:
        return int(self.stack.sql("SELECT COALESCE(MAX(id), 0) FROM audit_log")[0][0])

    async def call(self, route: tuple[str, str], path: str, body: Any = None, *, action: str | None = None,
                   target: str | Callable[[Any], str], actor: str = "admin", **kw: Any) -> Any:
        """Call `route` at `path`; it must succeed and add an "ok" entry of `action` (the route's, by default)
        by `actor` on `target` (or on target(answer)). Returns the answer."""
        method = route[0]
        before = self.last_id()
        if body is not None:
            kw["json_body"] = body
        status, answer = await self.api.request(method, path, **kw)
        assert 200 <= status < 300, (route, status, answer)
        rows = self.stack.sql("SELECT actor, action, resource, outcome, details FROM audit_log WHERE id > ? "
                              "ORDER BY id", (before,))
        want = (actor, action or AUDITED[route][0], target if isinstance(target, str) else target(answer), "ok")
        assert want in [r[:4] for r in rows], (route, want, rows)
        self.exercised.add(route)
        return answer


async def test_administrative_routes_leave_an_audit_entry(rig: Rig) -> None:
    stack, cs = rig.stack, rig.cs
    async with Api(stack.url) as admin, Api(stack.url) as anon:
        t = Trail(stack, admin)
        session = await t.call(("POST", "/auth/login"), "/auth/login",
                               {"username": "admin", "password": stack.admin_password}, target="user:admin")
        admin.token = session["session_token"]

        # vCenter logins (no vCenter is asked).
        route = ("POST", "/vmware-credentials")
        cred = await t.call(route, "/vmware-credentials", {
            "credential_name": "prod", "vcenter_host": "vc.example.com", "username": "administrator@vsphere.local",
            "password": "S3cret!", "datacenter": "DC1"}, target=lambda c: f"vmware_credential:{c['id']}")
        one = f"/vmware-credentials/{cred['id']}"
        target = f"vmware_credential:{cred['id']}"
        await t.call(("PUT", "/vmware-credentials/{credential_id}"), one, {"credential_name": "production"},
                     target=target)
        await t.call(("PUT", "/vmware-credentials/{credential_id}/set-default"), one + "/set-default", target=target)
        await t.call(("POST", "/vmware-credentials/{credential_id}/set-default"), one + "/set-default", target=target)
        await t.call(("DELETE", "/vmware-credentials/{credential_id}"), one, target=target)

        # Repositories, policies and a policy's on-demand prune.
        root = stack.state / "repositories" / "audit"  # inside nbd-pool's export roots of the stack
        root.mkdir(parents=True)
        repo = await t.call(("POST", "/repositories"), "/repositories",
                            {"name": "local", "type": "local", "config": {"disk_path": str(root)}},
                            target=lambda r: f"repository:{r['id']}")
        policy = await t.call(("POST", "/policies"), "/policies",
                              {"name": "keep-7", "primary_repository_id": repo["id"], "retention_days": 7},
                              target=lambda p: f"policy:{p['id']}")
        for dry_run in ("true", "false"):
            await t.call(("POST", "/policies/{policy_id}/prune"), f"/policies/{policy['id']}/prune",
                         params={"dry_run": dry_run}, target=f"policy:{policy['id']}")
        await t.call(("DELETE", "/policies/{policy_id}"), f"/policies/{policy['id']}",
                     target=f"policy:{policy['id']}")

        # Schedules, machine groups and a VM's groups.
        ctx = "ctx-web-20250101-000000"
        stack.sql("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
                  "created_at, updated_at) VALUES (?, 'web', '4210-1', '/DC1/vm/web', 'vc.example.com', 't', 't')",
                  (ctx,))
        stack.sql("INSERT INTO vm_networks (vm_context_id, position, label, network_name) "
                  "VALUES (?, 0, 'Network adapter 1', 'VM Network')", (ctx,))
        sched = await t.call(("POST", "/schedules"), "/schedules",
                             {"name": "nightly", "cron_expression": "0 30 2 * * *", "repository_id": repo["id"]},
                             target=lambda s: f"schedule:{s['id']}")
        one = f"/schedules/{sched['id']}"
        target = f"schedule:{sched['id']}"
        await t.call(("PUT", "/schedules/{schedule_id}"), one, {"max_concurrent_jobs": 2}, target=target)
        await t.call(("POST", "/schedules/{schedule_id}/enable"), one + "/enable", {"enabled": False},
                     target=target)
        await t.call(("POST", "/schedules/{schedule_id}/enable"), one + "/enable", {"enabled": True},
                     action="schedule.enable", target=target)
        await t.call(("POST", "/schedules/{schedule_id}/trigger"), one + "/trigger", target=target)
        group = await t.call(("POST", "/machine-groups"), "/machine-groups", {"name": "web tier"},
                             target=lambda g: f"machine_group:{g['id']}")
        one = f"/machine-groups/{group['id']}"
        target = f"machine_group:{group['id']}"
        await t.call(("PUT", "/machine-groups/{group_id}"), one, {"priority": 10}, target=target)
        await t.call(("POST", "/machine-groups/{group_id}/vms"), one + "/vms", {"vm_context_id": ctx}, target=target)
        await t.call(("DELETE", "/machine-groups/{group_id}/vms/{vm_context_id}"), f"{one}/vms/{ctx}", target=target)
        await t.call(("PUT", "/vm-contexts/{context_id}/group"), f"/vm-contexts/{ctx}/group",
                     {"group_id": group["id"]}, target=f"vm_context:{ctx}")
        await t.call(("DELETE", "/machine-groups/{group_id}"), one, target=target)
        await t.call(("DELETE", "/schedules/{schedule_id}"), f"/schedules/{sched['id']}",
                     target=f"schedule:{sched['id']}")

        # CloudStack configs (the envelope and the setup wizard's save) and a VM's network mappings.
        zone = next(iter(cs.inv.zones))
        fields = {"name": "primary", "api_url": cs.endpoint, "api_key": cs.api_key, "secret_key": cs.secret_key,
                  "zone": zone, "oma_vm_id": cs.appliance_vm_id}
        route = ("POST", "/ossea/config")
        made = await t.call(route, "/ossea/config", {"action": "create", "config": {**fields, "name": "spare"}},
                            target=lambda a: f"ossea_config:{a['config']['id']}")
        target = f"ossea_config:{made['config']['id']}"
        await t.call(route, "/ossea/config", {"action": "update", "id": made["config"]["id"],
                                              "config": {"domain": "ROOT"}}, action="ossea_config.update",
                     target=target)
        await t.call(route, "/ossea/config", {"action": "delete", "id": made["config"]["id"]},
                     action="ossea_config.delete", target=target)
        await t.call(("POST", "/ossea/config-streamlined"), "/ossea/config-streamlined",
                     {"api_url": cs.endpoint, "api_key": cs.api_key, "secret_key": cs.secret_key, "zone_id": zone,
                      "oma_vm_id": cs.appliance_vm_id}, target=lambda a: f"ossea_config:{a['config']['id']}")
        prod = next(n for n in cs.inv.networks.values() if n.name == "prod-net")
        await t.call(("POST", "/network-mappings"), "/network-mappings",
                     {"vm_id": ctx, "source_network_name": "VM Network", "destination_network_id": prod.id,
                      "destination_network_name": prod.name}, target=f"vm_context:{ctx}")
        await t.call(("DELETE", "/network-mappings/{vm_id}/{source_network_name}"),
                     f"/network-mappings/{ctx}/{quote('VM Network')}", target=f"vm_context:{ctx}")

        # An administrator's own NBD export: a port, qemu-nbd on it, stopped, released.
        image = root / "disk.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
        alloc = await t.call(("POST", "/nbd/ports/allocate"), "/nbd/ports/allocate",
                             {"job_id": "audit-job", "export_name": "audit-disk"}, target="nbd_job:audit-job")
        port = alloc["allocated_ports"][0]["port"]
        start = ("POST", "/nbd/qemu-nbd/start")
        await t.call(start, "/nbd/qemu-nbd/start", {"export_name": "audit-disk", "port": port,
                                                    "qcow2_path": str(image), "read_only": True},
                     target="export:audit-disk")
        status, _ = await admin.post("/nbd/qemu-nbd/start", {"export_name": "elsewhere", "port": port,
                                                             "qcow2_path": "/etc/shadow"})
        assert status == 400 and _["error"] == "path outside the export roots", _
        refused = stack.sql("SELECT actor, resource, outcome FROM audit_log WHERE action = 'nbd.export.start' "
                            "ORDER BY id DESC LIMIT 1")
        assert refused == [("admin", "export:elsewhere", "failed")]
        await t.call(("POST", "/nbd/qemu-nbd/stop"), "/nbd/qemu-nbd/stop", {"export_name": "audit-disk"},
                     target="export:audit-disk")
        await t.call(("POST", "/nbd/ports/release"), "/nbd/ports/release", {"job_id": "audit-job"},
                     target="nbd_job:audit-job")
        await t.call(("DELETE", "/repositories/{repository_id}"), f"/repositories/{repo['id']}",
                     target=f"repository:{repo['id']}")

        # VMA enrollment: a pairing code, a VMA enrolling and proving its key, the administrator saying no.
        await t.call(("POST", "/admin/vma/pairing-code"), "/admin/vma/pairing-code", {},
                     target=lambda _: str(stack.sql("SELECT resource FROM audit_log WHERE action = "
                                                    "'vma.pairing_code.create' ORDER BY id DESC LIMIT 1")[0][0]))
        before = t.last_id()
        eid = await verified(admin, anon, VmaKey.fresh("audited-vma"))
        rows = stack.sql("SELECT actor, action, resource FROM audit_log WHERE id > ? ORDER BY id", (before,))
        assert ("vma:audited-vma", "vma.enroll", f"enrollment:{eid}") in rows, rows
        assert ("vma:audited-vma", "vma.verify", f"enrollment:{eid}") in rows, rows
        t.exercised |= {("POST", "/vma/enroll"), ("POST", "/vma/enroll/verify")}
        await t.call(("POST", "/admin/vma/reject/{enrollment_id}"), f"/admin/vma/reject/{eid}",
                     {"rejected_by": "ops", "reason": "unknown VMA"}, target=f"enrollment:{eid}")

        await t.call(("POST", "/auth/logout"), "/auth/logout", target="user:admin")

    assert t.exercised == {r for r, (_, where) in AUDITED.items() if where == HERE}
    # No secret went into the trail.
    details = " ".join(d for (d,) in stack.sql("SELECT details FROM audit_log"))
    for secret in ("S3cret!", cs.secret_key, stack.admin_password):
        assert secret not in details
    assert all(isinstance(json.loads(d), dict) for (d,) in stack.sql("SELECT details FROM audit_log"))
