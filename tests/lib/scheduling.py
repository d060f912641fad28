"""Test tools for the scheduler: a clock moved by hand, a real launcher that creates job rows through the job
engine (finished when the test says), VM contexts seeded straight into the database, and the whole domain
built around one database — shared by tests/omad/test_scheduler.py and bench/scheduler; and `run_now`, a
schedule run by hand through the real omad's API, awaited (the scheduled backup and replication tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from oma_common.errors import Conflict, Invalid, OmaError
from omad.audit import Audit
from omad.jobs.engine import JobEngine
from omad.schedule.clock import iso
from omad.schedule.groups import Groups
from omad.schedule.launcher import Outcome, Start, StartSlots, Target, VmRef, concurrently
from omad.schedule.scheduler import Scheduler
from omad.schedule.schedules import Schedules
from omad.store import jobs as job_store
from omad.store.db import Database

from ..rig import Api


class FakeClock:
    """Time that moves only when told; sleepers wake when it passes their deadline."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + timedelta(seconds=seconds), next(self._seq), fut))
        await fut

    def set(self, when: datetime) -> None:
        assert when >= self._now, "time does not run backwards here"
        self._now = when
        while self._sleepers and self._sleepers[0][0] <= when:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def advance(self, **delta: float) -> None:
        self.set(self._now + timedelta(**delta))


class EngineLauncher:
    """A real launcher: each start creates a running "backup" (or `kind`) job row through the JobEngine, as the
    backup domain does, all of a batch in one transaction; the test finishes jobs when it wants. Like the backup
    domain it refuses (Conflict) a VM that already has an active job, and it can be told to refuse a VM's start,
    to fail one with a bug, or to start slowly: with a gate, it starts VMs one by one, as many at once as the
    scheduler's slots allow (like the real launchers), and each start waits for the gate."""

    def __init__(self, engine: JobEngine, kind: str = "backup", *, skips_busy: bool = False) -> None:
        self.engine = engine
        self.kind = kind
        self.skips_busy = skips_busy  # what the scheduler does with a busy VM (JobLauncher.skips_busy)
        self.started: list[tuple[str, str, str]] = []  # (vm_name, job_id, schedule_id) in start order
        self.refuse: dict[str, Exception] = {}  # vm_name → what its start raises (an OmaError, or a bug)
        self.gate: asyncio.Event | None = None  # when set, each start waits for it (a slow start)
        self.entered = asyncio.Event()  # a start has begun
        self.in_flight = 0  # starts begun and not ended
        self.most_in_flight = 0  # the most at once
        self.changed = asyncio.Condition()  # in_flight changed

    async def check(self, target: Target) -> None:
        if self.kind == "backup" and target.repository_id is None and target.policy_id is None:
            raise Invalid("invalid schedule", "repository_id: a backup schedule needs a repository_id or a "
                                              "policy_id", field="repository_id")

    async def start_many(self, starts: Sequence[Start], slots: StartSlots | None = None
                         ) -> AsyncGenerator[tuple[Start, Outcome], None]:
        if self.gate is not None:
            async for item in concurrently(lambda one: self.start(one.vm, one.target), starts, slots):
                yield item
            return
        self.entered.set()
        busy = await job_store.busy_contexts(self.engine.db, [s.vm.context_id for s in starts])
        outcomes: list[Outcome] = []
        new: list[tuple[Start, job_store.NewJob]] = []
        for s in starts:
            refusal = self.refuse.get(s.vm.vm_name)
            if refusal is not None and not isinstance(refusal, OmaError):
                raise refusal  # a launcher bug: the whole batch fails
            if refusal is not None:
                outcomes.append(refusal)
            elif s.vm.context_id in busy:
                outcomes.append(Conflict(f"{self.kind} in progress", f"{s.vm.vm_name} has a running job "
                                                                     f"({busy[s.vm.context_id]})"))
            else:
                job = self._job(s.vm, s.target)
                new.append((s, job))
                outcomes.append(job.id)
        await self.engine.create_many([job for _, job in new])
        self.started.extend((s.vm.vm_name, job.id, s.target.schedule_id) for s, job in new)
        for s, outcome in zip(starts, outcomes):
            yield s, outcome

    async def start(self, vm: VmRef, target: Target) -> str:
        self.entered.set()
        await self._count(+1)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if vm.vm_name in self.refuse:
                raise self.refuse[vm.vm_name]
            active = await job_store.active_for_context(self.engine.db, vm.context_id)
            if active:
                raise Conflict(f"{self.kind} in progress", f"{vm.vm_name} has a running job ({active})")
            job = self._job(vm, target)
            await self.engine.create_many([job])
            self.started.append((vm.vm_name, job.id, target.schedule_id))
            return job.id
        finally:
            await self._count(-1)

    async def _count(self, delta: int) -> None:
        async with self.changed:
            self.in_flight += delta
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.changed.notify_all()

    async def wait_in_flight(self, count: int) -> None:
        """Return once `count` starts are in progress at once."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.in_flight == count)

    def _job(self, vm: VmRef, target: Target) -> job_store.NewJob:
        return self.engine.new(self.kind, display_name=f"{self.kind} of {vm.vm_name}", context_id=vm.context_id,
                               details={"schedule_id": target.schedule_id, "type": target.backup_type})

    async def running(self) -> list[dict[str, Any]]:
        """Active jobs of this launcher's kind with their VM name, oldest first."""
        return await self.engine.db.fetchall(
            "SELECT j.id, j.context_id, c.vm_name FROM jobs j JOIN vm_replication_contexts c "
            "ON c.context_id = j.context_id WHERE j.status IN ('pending', 'running') AND j.job_type = ? "
            "ORDER BY j.created_at, j.id", (self.kind,))

    async def finish(self, job_id: str, status: str = "completed", error: str | None = None) -> None:
        await self.engine.finish(job_id, status, error)

    async def finish_all(self, status: str = "completed") -> int:
        jobs = await self.running()
        for j in jobs:
            await self.finish(j["id"], status, None if status == "completed" else "simulated failure")
        return len(jobs)


async def add_contexts(db: Database, names: list[str]) -> dict[str, str]:
    """VM contexts straight into the database; returns name → context id."""
    now = "2025-01-01T00:00:00.000Z"
    ids = {name: f"ctx-{name}-20250101-000000" for name in names}
    async with db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(cid, name, f"4210-{i:06d}", f"/DC1/vm/{name}", "vc.example.com", now, now)
             for i, (name, cid) in enumerate(ids.items())])
    return ids


@dataclasses.dataclass
class Domain:
    """Schedules, groups and the scheduler on one database, with a fake clock and the engine launcher."""

    db: Database
    clock: FakeClock
    engine: JobEngine
    launcher: EngineLauncher
    replicator: EngineLauncher  # the "replication" action's launcher: skips busy VMs
    scheduler: Scheduler
    schedules: Schedules
    groups: Groups

    async def schedule(self, name: str, cron_expression: str, **fields: Any) -> dict[str, Any]:
        values = {"name": name, "cron_expression": cron_expression, "description": "", "timezone": "UTC",
                  "enabled": True, "skip_if_running": True, "max_concurrent_jobs": 10, "retry_attempts": 0,
                  "retry_delay_minutes": 10, "action": "backup", "backup_type": "auto", "repository_id": "1",
                  "policy_id": None, "replication_type": None, **fields}
        return await self.schedules.create(values, actor="admin")

    async def group(self, name: str, schedule_id: str | None, vms: list[str], *, max_concurrent_vms: int = 10,
                    priority: int = 50, vm_priority: int = 50) -> dict[str, Any]:
        group = await self.groups.create({"name": name, "description": "", "schedule_id": schedule_id,
                                          "max_concurrent_vms": max_concurrent_vms, "priority": priority},
                                         actor="admin")
        if vms:
            await self.groups.add_vms(group["id"], vms, priority=vm_priority, enabled=True, field="vm_context_ids",
                                      actor="admin")
        return group

    async def at_next_run(self, schedule_id: str) -> datetime:
        """Move the clock to the schedule's next due time and tick."""
        row = await self.db.fetchone("SELECT next_run_at FROM schedules WHERE id = ?", (schedule_id,))
        assert row and row["next_run_at"], "the schedule has no next run"
        when = datetime.fromisoformat(row["next_run_at"].replace("Z", "+00:00"))
        self.clock.set(when)
        await self.scheduler.tick()
        return when

    async def executions(self, schedule_id: str) -> list[dict[str, Any]]:
        page = await self.schedules.executions(schedule_id, limit=1000, offset=0, status=None)
        return list(reversed(page["executions"]))  # oldest first


def build(db: Database, clock: FakeClock, **scheduler_options: Any) -> Domain:
    audit = Audit(db)
    engine = JobEngine(db)
    launcher = EngineLauncher(engine)
    replicator = EngineLauncher(engine, "replication", skips_busy=True)
    launchers = {"backup": launcher, "replication": replicator}
    scheduler = Scheduler(db, audit, launchers, clock, **scheduler_options)
    schedules = Schedules(db, audit, clock, launchers, on_change=scheduler.wake,
                          disabling=scheduler.disabling)
    groups = Groups(db, audit, on_change=scheduler.wake)
    return Domain(db, clock, engine, launcher, replicator, scheduler, schedules, groups)


async def run_now(api: Api, schedule_id: str, *, log_tail: Callable[[], str] = lambda: "",
                  timeout: float = 120) -> dict[str, Any]:
    """Trigger a schedule through omad's API and wait for the execution to end; returns it with its VMs and jobs."""
    status, run = await api.post(f"/schedules/{schedule_id}/trigger")
    assert status == 202, run
    return await wait_run(api, schedule_id, run["id"], log_tail=log_tail, timeout=timeout)


async def wait_run(api: Api, schedule_id: str, execution_id: int, *, log_tail: Callable[[], str] = lambda: "",
                   timeout: float = 120) -> dict[str, Any]:
    """Wait for an execution to end; returns it with its VMs and jobs."""
    deadline = time.monotonic() + timeout
    while True:
        status, detail = await api.get(f"/schedules/{schedule_id}/executions/{execution_id}")
        assert status == 200, detail
        if detail["status"] != "running":
            return dict(detail)
        assert time.monotonic() < deadline, f"execution still running after {timeout}s:\n{log_tail()}"
        await asyncio.sleep(0.1)


__all__ = ["Domain", "EngineLauncher", "FakeClock", "add_contexts", "build", "iso", "run_now", "wait_run"]
