"""A backup's disk image for restore: the top of that disk's chain in the backup's repository."""

from __future__ import annotations

from pathlib import Path

from oma_common.errors import NotFound

from ..store.db import Database
from .service import DiskImage


class RepositoryImages:
    """Looks the image up in the backup tables (the QCOW2 path is stored relative to the repository)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def image_for(self, backup_id: str, disk_index: int) -> DiskImage:
        row = await self.db.fetchone(
            "SELECT j.status, r.root_path, d.qcow2_path FROM backup_jobs j "
            "JOIN backup_repositories r ON r.id = j.repository_id "
            "LEFT JOIN backup_disks d ON d.backup_id = j.backup_id AND d.disk_index = ? "
            "WHERE j.backup_id = ?", (disk_index, backup_id))
        if row is None:
            raise NotFound("backup not found", f"backup {backup_id} does not exist")
        if row["qcow2_path"] is None:
            raise NotFound("disk not found", f"backup {backup_id} has no disk {disk_index}")
        return DiskImage(str(Path(row["root_path"]) / row["qcow2_path"]), row["status"])
