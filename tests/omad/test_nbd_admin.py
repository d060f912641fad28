"""An administrator's NBD change whose audit entry cannot be written (the storage full, the database locked) is
refused (507/503) and leaves nothing behind: the export started is stopped, the ports allocated are released."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from oma_common.contracts.nbd_pool import Allocated, Export, PortName, Released, Stopped
from omad.audit import Audit
from omad.clients.nbdpool import NbdPool
from omad.nbd_admin import NbdAdmin
from omad.store.db import StorageFull


class FakePool:
    """nbd-pool as far as NbdAdmin calls it: what it holds after each call."""

    def __init__(self) -> None:
        self.ports: dict[int, str] = {}  # port → job
        self.exports: dict[str, int] = {}  # export name → pid

    async def allocate(self, job_id: str, count: int, export_names: list[str]) -> Allocated:
        out = [PortName(10810 + len(self.ports) + i, name) for i, name in enumerate(export_names)]
        self.ports.update({p.port: job_id for p in out})
        return Allocated(job_id, out, "2026-12-07T05:00:00Z", 3600)

    async def release(self, job_id: str | None = None, ports: list[int] | None = None) -> Released:
        gone = [p for p, j in self.ports.items() if j == job_id or p in (ports or [])]
        for p in gone:
            del self.ports[p]
        return Released(True, len(gone), gone, 0, [])

    async def start_export(self, *, export_name: str, port: int, path: str, read_only: bool,
                           shared_connections: int) -> Export:
        self.exports[export_name] = 4242
        return Export(4242, port, export_name, path, path, path, "qcow2", read_only)

    async def stop_export(self, *, pid: int | None = None, export_name: str | None = None) -> Stopped:
        name = export_name or next(n for n, p in self.exports.items() if p == pid)
        return Stopped(True, self.exports.pop(name))


class FullAudit:
    async def record(self, *args: Any, **kwargs: Any) -> None:
        raise StorageFull("the appliance's storage is full", "nothing of this change was stored")


@pytest.fixture
def pool() -> FakePool:
    return FakePool()


@pytest.fixture
def admin(pool: FakePool) -> NbdAdmin:
    return NbdAdmin(cast(NbdPool, pool), cast(Audit, FullAudit()))


async def test_an_export_whose_audit_cannot_be_written_is_stopped(pool: FakePool, admin: NbdAdmin,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(StorageFull):
        await admin.start_export(export_name="disk", port=10810, path=str(tmp_path / "d.qcow2"), read_only=False,
                                 shared_connections=1, actor="admin")
    assert pool.exports == {}


async def test_ports_whose_audit_cannot_be_written_are_released(pool: FakePool, admin: NbdAdmin) -> None:
    with pytest.raises(StorageFull):
        await admin.allocate("job-1", ["disk-0", "disk-1"], actor="admin")
    assert pool.ports == {}
