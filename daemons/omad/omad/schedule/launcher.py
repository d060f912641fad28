"""What a scheduled run starts for each VM: the JobLauncher protocol, and the adapters onto the backup and the
replication domains."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from oma_common.errors import Conflict, Internal, Invalid, NotFound, OmaError

from ..backup.backups import StartRequest
from ..inventory.vmspec import VmSpec
from ..jobs.engine import JobEngine
from ..replication import replications as replication
from ..store import contexts as contexts_store
from ..store import ossea as ossea_store
from ..store.base import Reader

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a schedule asks to be done to each of its VMs."""

    schedule_id: str
    schedule_name: str
    action: str  # "backup" | "replication"
    backup_type: str  # full | incremental | auto (incremental when a previous backup allows it)
    repository_id: str | None
    policy_id: str | None
    replication_type: str | None = None  # full | incremental | auto (detected: incremental when change ids allow)


@dataclasses.dataclass(frozen=True)
class VmRef:
    context_id: str
    vm_name: str


@dataclasses.dataclass(frozen=True)
class Start:
    """One job to start: a VM, what its schedule asks for, and the execution and group it is started for."""

    vm: VmRef
    target: Target
    execution_id: int | None = None
    group_id: str | None = None


Outcome = str | OmaError  # the started job's id, or why the start was refused


class JobLauncher(Protocol):
    """Starts one job per VM on behalf of a schedule.

    Each job is a row in `jobs` whose context_id is the VM's context. The scheduler learns that it finished by
    reading that row — the shared truth every job type keeps — so a launcher reports nothing afterwards.

    `skips_busy` is what the scheduler does with a VM that has another active job when its turn comes: False,
    it waits for that job to end (a backup taken later is a different backup); True, it is skipped in this run
    (a replication running already brings the VM's volumes up to date).
    """

    skips_busy: bool

    async def check(self, target: Target) -> None:
        """Raise Invalid, naming the field, when a schedule with this target could never start a job."""

    def start_many(self, starts: Sequence[Start], slots: StartSlots | None = None
                   ) -> AsyncGenerator[tuple[Start, Outcome], None]:
        """Start a job for each VM and yield each start with its job's id in `jobs` or the OmaError that refused
        it: Conflict when the VM is busy (the scheduler waits and asks again, without counting an attempt); any
        other OmaError is a failed start, counted and retried as the schedule says.

        A launcher that can create all the jobs at once does so in one transaction; one that starts them one
        by one runs as many at once as `slots` allows (one when none is given; see `concurrently`) and yields
        each as it ends. A start that has not begun when `slots` says no more (omad stops, its schedule was
        disabled) is not begun and not yielded: its VM waits for a later tick.
        """


class StartSlots:
    """How many starts run at once, across every launcher and every tick (config: scheduler.start_concurrency),
    and whether a start still waiting for its turn may begin."""

    def __init__(self, size: int, may_begin: Callable[[Start], bool] = lambda start: True) -> None:
        self.size = size
        self.may_begin = may_begin
        self._free = asyncio.Semaphore(size)
        self._closed = False
        self.queued: set[Start] = set()  # starts waiting for their turn

    def close(self) -> None:
        """omad stops: the starts in progress end; those waiting for a slot do not begin."""
        self._closed = True

    def reopen(self) -> None:
        self._closed = False

    @contextlib.asynccontextmanager
    async def turn(self, start: Start) -> AsyncIterator[bool]:
        """Hold a slot while the start runs; yields whether it may begin."""
        self.queued.add(start)
        try:
            await self._free.acquire()
        finally:
            self.queued.discard(start)
        try:
            yield not self._closed and self.may_begin(start)
        finally:
            self._free.release()


async def concurrently(start: Callable[[Start], Awaitable[str]], starts: Sequence[Start],
                       slots: StartSlots | None = None) -> AsyncGenerator[tuple[Start, Outcome], None]:
    """`start_many` for a launcher whose starts take a while each (a replication creates and attaches volumes,
    each a CloudStack job): as many at once as `slots` allows, each yielded as it ends. A bug in one start
    fails that start, visibly, and the others still run; a start that may not begin any more is left out."""
    limit = slots or StartSlots(1)

    async def one(s: Start) -> tuple[Start, Outcome] | None:
        async with limit.turn(s) as go:
            if not go:
                return None
            outcome: Outcome
            try:
                outcome = await start(s)
            except OmaError as e:
                outcome = e
            except Exception as e:  # noqa: BLE001 - a launcher bug must not stop the scheduler
                log.exception("launcher failed", extra={"resource": s.vm.context_id})
                outcome = OmaError("internal error", f"starting the {s.target.action} failed unexpectedly: {e}")
            return s, outcome

    tasks = [asyncio.ensure_future(one(s)) for s in starts]
    try:
        for ended in asyncio.as_completed(tasks):
            result = await ended
            if result is not None:
                yield result
    finally:  # closed early (omad stopped before they ended): what has not ended is given up
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BackupStarter(Protocol):
    """The backup domain's entry point (omad/backup/backups.py), the one POST /backups calls.

    It records the backup and its job (job id = backup id) before anything can fail, answers the spec's
    BackupResponse, raises Conflict while the VM has a backup running, Invalid for an incremental with no
    completed backup to continue, and any error after the rows exist carries the `backup_id` it failed.
    """

    async def start(self, req: StartRequest, *, actor: str) -> dict[str, Any]: ...


class RepositoryLookup(Protocol):
    async def row(self, repo_id: str) -> dict[str, Any]: ...


def _job_id(result: Any, what: str = "backup") -> str:
    if isinstance(result, str):
        return result
    for key in ("job_id", "backup_id"):
        value = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
        if value:
            return str(value)
    raise Internal(f"{what} started without an id", f"the {what} service returned {type(result).__name__} "
                                                   "without job_id or backup_id")


class BackupLauncher:
    """Scheduled backups through the same domain function as POST /backups."""

    skips_busy = False

    def __init__(self, backups: BackupStarter, jobs: JobEngine, repositories: RepositoryLookup | None = None) -> None:
        self.backups = backups
        self.jobs = jobs
        self.repositories = repositories

    async def check(self, target: Target) -> None:
        if target.repository_id is None:
            why = " (a policy cannot choose the repository yet)" if target.policy_id else ""
            raise Invalid("invalid schedule", f"repository_id: a backup schedule needs a repository_id{why}",
                          field="repository_id")
        if self.repositories is not None:
            try:
                await self.repositories.row(target.repository_id)
            except NotFound as e:
                raise Invalid("unknown repository", f"repository_id: backup repository {target.repository_id!r} "
                                                     "does not exist", field="repository_id") from e

    def start_many(self, starts: Sequence[Start], slots: StartSlots | None = None
                   ) -> AsyncGenerator[tuple[Start, Outcome], None]:
        """Each start runs the backup domain's own steps (its rows, nbd-pool, the VMA), `slots` at once."""
        return concurrently(lambda one: self.start(one.vm, one.target), starts, slots)

    async def start(self, vm: VmRef, target: Target) -> str:
        """Start one VM's backup; return its job id (raises as `start_many` reports)."""
        assert target.repository_id is not None  # check() made sure
        kinds = ["incremental", "full"] if target.backup_type == "auto" else [target.backup_type]
        tags = {"schedule_id": target.schedule_id, "schedule_name": target.schedule_name}
        result: Any = None
        for kind in kinds:
            req = StartRequest(vm.vm_name, target.repository_id, kind, target.policy_id, tags)
            try:
                result = await self.backups.start(req, actor=f"scheduler:{target.schedule_name}")
                break
            except Conflict:
                raise  # the VM is busy (its backup_id is the running one, not ours): the scheduler waits
            except OmaError as e:
                if "backup_id" in e.extra:
                    # The backup was recorded, then failed: its job row says so, and the scheduler follows it
                    # like any other job (counted, retried).
                    return str(e.extra["backup_id"])
                if isinstance(e, Invalid) and kind == "incremental" and target.backup_type == "auto":
                    # Nothing to continue in that repository (the first run, or the chain was deleted).
                    log.info("%s: %s; a full backup instead", vm.vm_name, e.details, extra={"resource": vm.context_id})
                    continue
                raise
        job_id = _job_id(result)
        try:
            await self.jobs.get(job_id)  # the scheduler follows the job through its row: it must exist
        except NotFound as e:
            raise Internal("backup has no job row", f"backup {job_id} of {vm.vm_name!r} started, but no job "
                                                    f"{job_id} exists to follow") from e
        return job_id


class ReplicationStarter(Protocol):
    """The replication domain's entry point (omad/replication/replications.py), the one POST /replications calls.

    It records the replication and its job before anything can fail, raises Conflict while the VM has a
    replication running (its `job_id` is the running one), and any error after the rows exist carries the
    `job_id` it failed.
    """

    async def start(self, req: replication.StartRequest, *, actor: str) -> dict[str, Any]: ...


# A schedule's replication_type (CONTRACTS.md "Schedules") → POST /replications' (None: detected by the domain).
REPLICATION_TYPES: dict[str, str | None] = {"full": "initial", "incremental": "incremental", "auto": None}


class ReplicationLauncher:
    """Scheduled replications through the same domain function as POST /replications, `slots` at once (each
    start creates or attaches volumes and asks the VMA, like an API call)."""

    skips_busy = True

    def __init__(self, replications: ReplicationStarter, db: Reader) -> None:
        self.replications = replications
        self.db = db

    async def check(self, target: Target) -> None:
        if target.replication_type not in REPLICATION_TYPES:
            raise Invalid("invalid schedule", "replication_type: a replication schedule needs one of "
                                              f"{', '.join(REPLICATION_TYPES)}", field="replication_type")

    def start_many(self, starts: Sequence[Start], slots: StartSlots | None = None
                   ) -> AsyncGenerator[tuple[Start, Outcome], None]:
        return concurrently(self.start, starts, slots)

    async def start(self, one: Start) -> str:
        """Start one VM's replication; return its job id (raises as `start_many` reports)."""
        target = one.target
        ctx = await contexts_store.by_id(self.db, one.vm.context_id)
        config_id = ctx.ossea_config_id
        if config_id is None:
            default = await ossea_store.default(self.db)
            if default is None:
                raise Invalid("no CloudStack config", f"{ctx.vm_name!r} has no CloudStack config and none is the "
                                                      "default; save one (POST /ossea/config)")
            config_id = default.id
        req = replication.StartRequest(
            VmSpec(id=ctx.vmware_vm_id, name=ctx.vm_name), config_id,
            REPLICATION_TYPES.get(target.replication_type or "auto"), vcenter_host=ctx.vcenter_host,
            datacenter=ctx.datacenter, schedule_execution_id=str(one.execution_id) if one.execution_id else None,
            vm_group_id=one.group_id, scheduled_by=target.schedule_name)
        try:
            result = await self.replications.start(req, actor=f"scheduler:{target.schedule_name}")
        except Conflict:
            raise  # the VM is busy (its job_id is the running one, not ours): the scheduler skips it
        except OmaError as e:
            if "job_id" in e.extra:
                return str(e.extra["job_id"])  # recorded, then failed: followed through its job row like any other
            raise
        return _job_id(result, "replication")
