"""Discovery through the VMA: which VMs a vCenter has, which are already managed, and adding them.

Nothing is written unless the VMA answered with a usable inventory. Existing contexts are found by VMware
id (then by name, which is unique among contexts) and never duplicated; a re-discovery brings their specs
up to date and reports what changed. All writes of one call happen in one transaction, whose write lock
also serialises concurrent adds of the same VM.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

from oma_common.errors import Invalid, Unavailable

from ..audit import Audit
from ..clients.vma import VmaClient
from ..store.contexts import ContextKey
from ..store.db import Database, Tx, utcnow
from ..store.inventory import Source
from .contexts import Contexts
from .credentials import Credentials, VCenterLogin
from .vmspec import VmSpec, parse_vms
from .vms import Vms

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Target:
    """Which vCenter: a saved credential, or the fields of a manual entry (nothing: the default credential)."""

    credential_id: int | None = None
    vcenter: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    datacenter: str | None = None


@dataclasses.dataclass
class Found:
    vms: list[VmSpec]
    login: VCenterLogin
    seconds: float


def duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


class Discovery:
    def __init__(self, db: Database, audit: Audit, credentials: Credentials, vma: VmaClient, contexts: Contexts,
                 vms: Vms) -> None:
        self.db = db
        self.audit = audit
        self.credentials = credentials
        self.vma = vma
        self.contexts = contexts
        self.vms = vms

    # -- the calls -----------------------------------------------------------------------------------

    async def discover(self, target: Target, *, filter: str | None, create_context: bool,
                       selected: list[str] | None, actor: str) -> dict[str, Any]:
        found = await self._ask_vma(target, filter)
        started = time.monotonic()
        async with self.db.transaction() as tx:
            await self.vms.record(tx, found.login.vcenter, found.login.datacenter, found.vms, Source.DISCOVERY)
            # selected None with create_context: every new VM found.
            outcome = await self._apply(tx, found, add=selected if create_context else [], actor=actor)
        items = [self._item(vm, outcome) for vm in found.vms]
        body: dict[str, Any] = {
            "discovered_vms": items, "discovery_count": len(items), "processing_time": duration(found.seconds),
            "processing_ms": int(found.seconds * 1000), "status": "success",
            "vcenter": found.login.vcenter, "datacenter": found.login.datacenter,
            "message": f"discovered {len(items)} VMs ({sum(1 for i in items if i['existing'])} already managed)",
        }
        if create_context:
            body["addition_result"] = self._bulk_result(outcome, found.seconds, time.monotonic() - started)
            body["message"] += f"; added {len(outcome['added'])}"
        return body

    async def preview(self, target: Target, *, filter: str | None) -> dict[str, Any]:
        """What a discovery would find; writes nothing (no inventory, no usage count... except the VMA call)."""
        found = await self._ask_vma(target, filter)
        by_id, by_name = await self.contexts.known(self.db, found.login.vcenter)
        items = []
        for vm in found.vms:
            match = by_id.get(vm.id)
            item = vm.to_dict()
            item.update(existing=match is not None, context_id=match.context_id if match else None)
            if match is None and vm.name in by_name:
                item["name_taken_by"] = by_name[vm.name].context_id  # adding it would fail
            items.append(item)
        existing = sum(1 for i in items if i["existing"])
        body = {"vms": items, "total_discovered": len(items), "new_vms": len(items) - existing,
                "existing_vms": existing, "processing_time": duration(found.seconds),
                "processing_ms": int(found.seconds * 1000), "vcenter": found.login.vcenter,
                "datacenter": found.login.datacenter}
        if filter:
            body["filter"] = filter
        return body

    async def add(self, target: Target, names: list[str], *, actor: str, added_by: str | None = None
                  ) -> dict[str, Any]:
        """Add VMs by name: per-VM results; a VM already managed is reported (and refreshed), not duplicated.
        `added_by` is the client's label for who asked, recorded beside the actor, never instead of it."""
        found = await self._ask_vma(target, None)
        async with self.db.transaction() as tx:
            await self.vms.record(tx, found.login.vcenter, found.login.datacenter, found.vms, Source.DISCOVERY)
            outcome = await self._apply(tx, found, add=names, actor=actor, added_by=added_by)
        processed = []
        for name in names:
            if name in outcome["added"]:
                processed.append({"vm_name": name, "success": True, "context_id": outcome["added"][name]})
            elif name in outcome["skipped"]:
                cid, changes = outcome["skipped"][name]
                processed.append({"vm_name": name, "success": True, "context_id": cid, "existing": True,
                                  "changes": changes})
            else:
                processed.append({"vm_name": name, "success": False, "error": outcome["failed"][name]})
        failed = sum(1 for p in processed if not p["success"])
        added = len(outcome["added"])
        existing = len(outcome["skipped"])
        return {"success": failed == 0, "message": f"added {added} of {len(names)} VMs"
                + (f", {existing} already managed" if existing else "") + (f", {failed} failed" if failed else ""),
                "vms_added": added, "vms_existing": existing, "vms_failed": failed, "total_vms": len(names),
                "added_at": utcnow(), "processed_vms": processed}

    async def bulk_add(self, target: Target, *, filter: str | None, selected: list[str], actor: str
                       ) -> dict[str, Any]:
        """The legacy call: manual credentials, names to add, a BulkAddResult."""
        found = await self._ask_vma(target, filter)
        started = time.monotonic()
        async with self.db.transaction() as tx:
            await self.vms.record(tx, found.login.vcenter, found.login.datacenter, found.vms, Source.DISCOVERY)
            outcome = await self._apply(tx, found, add=selected, actor=actor)
        return self._bulk_result(outcome, found.seconds, time.monotonic() - started)

    # -- the parts -----------------------------------------------------------------------------------

    async def _login(self, t: Target) -> VCenterLogin:
        if t.credential_id is not None:
            login = await self.credentials.login_for(t.credential_id)
        elif t.vcenter or t.username or t.password:
            missing = [f for f in ("vcenter", "username", "password") if not getattr(t, f)]
            if missing:
                raise Invalid("incomplete vCenter login", f"a manual entry needs {', '.join(missing)} as well "
                                                          "(or send credential_id)")
            return VCenterLogin(t.vcenter or "", t.username or "", t.password or "", t.datacenter or "")
        else:
            login = await self.credentials.login_for(None)
        if t.datacenter:
            login = dataclasses.replace(login, datacenter=t.datacenter)
        return login

    async def _ask_vma(self, target: Target, filter: str | None) -> Found:
        login = await self._login(target)
        started = time.monotonic()
        raw = await self.vma.discover(vcenter=login.vcenter, username=login.username, password=login.password,
                                      datacenter=login.datacenter, filter=filter, thumbprint=login.thumbprint)
        try:
            vms = parse_vms(raw["vms"], "vms")
        except Invalid as e:
            raise Unavailable("VMA sent an unusable discovery answer", e.details) from e
        reported = raw.get("vcenter")
        if not login.datacenter and isinstance(reported, dict) and isinstance(reported.get("datacenter"), str):
            login = dataclasses.replace(login, datacenter=reported["datacenter"])
        seconds = time.monotonic() - started
        log.info("discovered %d VMs on %s in %.2f s", len(vms), login.vcenter, seconds)
        return Found(vms, login, seconds)

    async def _apply(self, tx: Tx, found: Found, *, add: list[str] | None, actor: str,
                     added_by: str | None = None) -> dict[str, Any]:
        """Refresh every managed VM found; create contexts for `add` (names; None = every new VM found).

        Returns {"added": {name: context_id}, "existing": {vmware_id: (context_id, changes)},
        "skipped": {name: (context_id, changes)} (asked for, already managed), "failed": {name: error},
        "requested": n}."""
        login = found.login
        by_id, by_name = await self.contexts.known(tx, login.vcenter)
        existing: dict[str, tuple[str, list[str]]] = {}  # by VMware id
        for vm in found.vms:
            match = by_id.get(vm.id)
            if match is not None:
                changes = await self.contexts.refresh(tx, match.context_id, vm)
                existing[vm.id] = (match.context_id, changes)
                if changes:
                    tx.after_commit(functools.partial(log.info, "context %s (%s): %s", match.context_id, vm.name,
                                                      "; ".join(changes)))
        wanted = [vm.name for vm in found.vms] if add is None else add
        by_vm_name: dict[str, list[VmSpec]] = {}
        for vm in found.vms:
            by_vm_name.setdefault(vm.name, []).append(vm)
        added: dict[str, str] = {}
        added_ids: dict[str, str] = {}
        skipped: dict[str, tuple[str, list[str]]] = {}
        failed: dict[str, str] = {}
        for name in dict.fromkeys(wanted):  # in order, each name once
            candidates = by_vm_name.get(name)
            if not candidates:
                failed[name] = f"no VM named {name!r} in vCenter {login.vcenter}"
                continue
            managed = next((existing[vm.id] for vm in candidates if vm.id in existing), None)
            if managed is not None:
                skipped[name] = managed
                continue
            vm = candidates[0]
            taken = by_name.get(name)
            if taken is not None:
                failed[name] = (f"another VM (VMware id {taken.vmware_vm_id} on {taken.vcenter_host}) is "
                                f"already managed under this name as {taken.context_id}")
                continue
            context_id = await self.contexts.create(tx, vm, vcenter_host=login.vcenter, datacenter=login.datacenter,
                                                    credential_id=login.credential_id, auto_added=True)
            added[name] = context_id
            added_ids[vm.id] = context_id
            by_name[name] = ContextKey(context_id, name, vm.id, login.vcenter)
            await self.audit.record(actor, "vm_context.create", f"vm_context:{context_id}", tx=tx, vm_name=name,
                                    vmware_vm_id=vm.id, vcenter_host=login.vcenter, disks=len(vm.disks),
                                    **({"added_by": added_by} if added_by else {}))
        return {"added": added, "added_ids": added_ids, "existing": existing, "skipped": skipped, "failed": failed,
                "requested": len(dict.fromkeys(wanted))}

    @staticmethod
    def _item(vm: VmSpec, outcome: dict[str, Any]) -> dict[str, Any]:
        item = vm.to_dict()
        if vm.id in outcome["existing"]:
            cid, changes = outcome["existing"][vm.id]
            item.update(existing=True, context_id=cid, updated=bool(changes), changes=changes)
        elif vm.id in outcome["added_ids"]:
            item.update(existing=False, context_id=outcome["added_ids"][vm.id], added=True)
        else:
            item.update(existing=False, context_id=None)
        return item

    @staticmethod
    def _bulk_result(outcome: dict[str, Any], discovery_s: float, processing_s: float) -> dict[str, Any]:
        added = [{"vm_name": n, "context_id": c} for n, c in outcome["added"].items()]
        skipped = [{"vm_name": n, "context_id": c, "reason": "already managed", "changes": ch}
                   for n, (c, ch) in outcome["skipped"].items()]
        failed = [{"vm_name": n, "error": e} for n, e in outcome["failed"].items()]
        return {"total_requested": outcome["requested"], "successfully_added": len(added), "skipped": len(skipped),
                "failed": len(failed), "added_vms": added, "skipped_vms": skipped, "failed_vms": failed,
                "discovery_duration": duration(discovery_s), "processing_duration": duration(processing_s)}
