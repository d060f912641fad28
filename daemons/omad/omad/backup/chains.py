"""Backup chains: a full backup and the incrementals that build on it, in one repository.

An incremental continues the VM's latest completed backup in the same repository, so a chain is a line:
full ← inc ← inc. Each of its images is backed by the same disk's image of the parent (a relative path in
the same directory). A backup that other backups are built on cannot be deleted; deleting from the newest
end always works.
"""

from __future__ import annotations

import json
from typing import Any

from oma_common.errors import Invalid

from ..inventory.contexts import Contexts
from ..store.db import Database, Tx

# What a chain lists of each backup.
_COLUMNS = ("backup_id, backup_type, parent_backup_id, chain_id, repository_id, status, created_at, completed_at, "
            "size_bytes, bytes_transferred, total_bytes, tags, policy_id")


async def latest_completed(db: Database | Tx, context_id: str, repository_id: str) -> dict[str, Any] | None:
    """The backup an incremental of this VM in this repository continues."""
    return await db.fetchone(
        "SELECT * FROM backup_jobs WHERE vm_context_id = ? AND repository_id = ? AND status = 'completed' "
        "ORDER BY completed_at DESC, created_at DESC LIMIT 1", (context_id, repository_id))


async def dependents(db: Database | Tx, backup_id: str) -> list[str]:
    """Backups whose images are (or are about to be) backed by this one's."""
    rows = await db.fetchall("SELECT backup_id FROM backup_jobs WHERE parent_backup_id = ? AND status != 'failed' "
                             "ORDER BY created_at", (backup_id,))
    return [r["backup_id"] for r in rows]


async def lineage(db: Database | Tx, backup_id: str) -> list[dict[str, Any]]:
    """The backup and every backup it is built on, oldest (the full) first."""
    out: list[dict[str, Any]] = []
    current: str | None = backup_id
    while current is not None and len(out) < 10000:
        row = await db.fetchone("SELECT b.*, r.root_path FROM backup_jobs b JOIN backup_repositories r "
                                "ON r.id = b.repository_id WHERE b.backup_id = ?", (current,))
        if row is None:
            break
        out.append(row)
        current = row["parent_backup_id"]
    out.reverse()
    return out


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
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM backup_jobs WHERE vm_context_id = ? AND status = 'completed' "
            "AND (? IS NULL OR repository_id = ?) ORDER BY completed_at, created_at",
            (context["context_id"], repository_id, repository_id))
        disks = await self._disks([r["backup_id"] for r in rows])
        chains: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            row["tags"] = json.loads(row["tags"] or "{}")
            row["disks"] = disks.get(row["backup_id"], [])
            chains.setdefault(row["chain_id"], []).append(row)
        summaries = [self._summary(chain_id, items) for chain_id, items in chains.items()]
        summaries.sort(key=lambda c: c["backups"][-1]["completed_at"] or "")
        latest = summaries[-1] if summaries else self._summary(None, [])
        return {"vm_name": context["vm_name"], "vm_context_id": context["context_id"], **latest,
                "chains": summaries, "chain_count": len(summaries)}

    async def _disks(self, backup_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        if not backup_ids:
            return out
        rows = await self.db.fetchall(
            "SELECT d.backup_id, d.disk_index, d.disk_id, d.capacity_bytes, d.qcow2_path, d.backing_file, "
            "d.change_id, d.size_bytes FROM backup_disks d JOIN backup_jobs b USING (backup_id) "
            "WHERE b.vm_context_id = (SELECT vm_context_id FROM backup_jobs WHERE backup_id = ?) "
            "AND b.status = 'completed' ORDER BY d.backup_id, d.disk_index", (backup_ids[0],))
        for r in rows:
            out.setdefault(r.pop("backup_id"), []).append(r)
        return out

    @staticmethod
    def _summary(chain_id: str | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"chain_id": chain_id, "full_backup_id": chain_id, "repository_id": items[0]["repository_id"]
                if items else None, "backups": items, "backup_count": len(items),
                "total_size_bytes": sum(int(i["size_bytes"] or 0) for i in items)}
