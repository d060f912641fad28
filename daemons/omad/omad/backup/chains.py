"""Backup chains: a full backup and the incrementals that build on it, in one repository.

An incremental continues the VM's latest completed backup in the same repository, so a chain is a line:
full ← inc ← inc. Each of its images is backed by the same disk's image of the parent (a relative path in
the same directory). A backup that other backups are built on cannot be deleted; deleting from the newest
end always works.
"""

from __future__ import annotations

from typing import Any

from oma_common.errors import Invalid

from ..inventory.contexts import Contexts
from ..store import backups as store
from ..store.db import Database


def _member(b: store.Backup, disks: list[store.BackupDisk]) -> dict[str, Any]:
    """What a chain lists of each backup."""
    return {"backup_id": b.backup_id, "backup_type": b.backup_type, "parent_backup_id": b.parent_backup_id,
            "chain_id": b.chain_id, "repository_id": b.repository_id, "status": b.status, "created_at": b.created_at,
            "completed_at": b.completed_at, "size_bytes": b.size_bytes, "bytes_transferred": b.bytes_transferred,
            "total_bytes": b.total_bytes, "tags": b.tag_map(), "policy_id": b.policy_id,
            "disks": [{"disk_index": d.disk_index, "disk_id": d.disk_id, "capacity_bytes": d.capacity_bytes,
                       "qcow2_path": d.qcow2_path, "backing_file": d.backing_file, "change_id": d.change_id,
                       "size_bytes": d.size_bytes} for d in disks]}


class Chains:
    def __init__(self, db: Database, contexts: Contexts) -> None:
        self.db = db
        self.contexts = contexts

    async def for_vm(self, *, vm_name: str | None = None, vm_context_id: str | None = None,
                     repository_id: str | None = None) -> dict[str, Any]:
        """The chains of a VM named by name or context id (404 when unknown)."""
        if vm_name:
            context = await self.contexts.by_name(vm_name)
        elif vm_context_id:
            context = await self.contexts.by_id(vm_context_id)
        else:
            raise Invalid("say which VM", "send vm_name or vm_context_id")
        return await self.of_vm(context, repository_id)

    async def of_vm(self, context: dict[str, Any], repository_id: str | None = None) -> dict[str, Any]:
        """Every chain of the VM's completed backups (oldest first inside a chain); the newest chain's
        figures at the top level, as the spec's single-chain answer has them."""
        backups = await store.completed_of_vm(self.db, context["context_id"], repository_id)
        disks = await store.disks_of_completed(self.db, context["context_id"]) if backups else {}
        chains: dict[str, list[dict[str, Any]]] = {}
        for b in backups:
            chains.setdefault(b.chain_id, []).append(_member(b, disks.get(b.backup_id, [])))
        summaries = [self._summary(chain_id, items) for chain_id, items in chains.items()]
        summaries.sort(key=lambda c: c["backups"][-1]["completed_at"] or "")
        latest = summaries[-1] if summaries else self._summary(None, [])
        return {"vm_name": context["vm_name"], "vm_context_id": context["context_id"], **latest,
                "chains": summaries, "chain_count": len(summaries)}

    @staticmethod
    def _summary(chain_id: str | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"chain_id": chain_id, "full_backup_id": chain_id, "repository_id": items[0]["repository_id"]
                if items else None, "backups": items, "backup_count": len(items),
                "total_size_bytes": sum(int(i["size_bytes"] or 0) for i in items)}
