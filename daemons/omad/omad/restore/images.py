"""A backup's disk image for restore: the top of that disk's chain in the backup's repository."""

from __future__ import annotations

from oma_common.errors import NotFound

from ..store import backups
from ..store.db import Database
from .service import DiskImage


class RepositoryImages:
    """Looks the image up in the backup tables (the QCOW2 path is stored relative to the repository)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def image_for(self, backup_id: str, disk_index: int) -> DiskImage:
        status, path = await backups.image_for_restore(self.db, backup_id, disk_index)
        if path is None:
            raise NotFound("disk not found", f"backup {backup_id} has no disk {disk_index}")
        return DiskImage(str(path), status)
