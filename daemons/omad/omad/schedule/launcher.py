"""What a scheduled run starts for each VM: the JobLauncher protocol, and the adapter onto the backup domain."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol

from oma_common.errors import Internal, Invalid, NotFound, Unavailable

from ..jobs.engine import JobEngine

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a schedule asks to be done to each of its VMs."""

    schedule_id: str
    schedule_name: str
    action: str  # "backup" (replication joins when it exists)
    backup_type: str  # full | incremental | auto (incremental when a previous backup allows it)
    repository_id: str | None
    policy_id: str | None


@dataclasses.dataclass(frozen=True)
class VmRef:
    context_id: str
    vm_name: str


class JobLauncher(Protocol):
    """Starts one job for one VM on behalf of a schedule.

    The job is a row in `jobs` whose context_id is the VM's context. The scheduler learns that it finished by
    reading that row — the shared truth every job type keeps — so a launcher reports nothing afterwards.
    """

    async def check(self, target: Target) -> None:
        """Raise Invalid, naming the field, when a schedule with this target could never start a job."""

    async def start(self, vm: VmRef, target: Target) -> str:
        """Start the job; return its id in `jobs`.

        Raise Conflict when the VM is busy: the scheduler waits and asks again, without counting an attempt.
        Any other OmaError is a failed start: counted, and retried as the schedule says.
        """


class BackupStarter(Protocol):
    """The backup domain's entry point (omad/backup, branch `backups`), the one POST /backups calls.

    Expected: `start(vm_name, repository_id, backup_type, policy_id=None)` returns the backup's job id (a str),
    or a dict / object carrying `job_id` or `backup_id`, after it has created the job row; it raises Invalid
    for an incremental without a completed previous backup and Conflict while the VM has a running backup.
    """

    async def start(self, vm_name: str, repository_id: str | None, backup_type: str,
                    policy_id: str | None = None) -> Any: ...


def _job_id(result: Any) -> str:
    if isinstance(result, str):
        return result
    for key in ("job_id", "backup_id"):
        value = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
        if value:
            return str(value)
    raise Internal("backup started without an id", f"the backup service returned {type(result).__name__} "
                                                    "without job_id or backup_id")


class BackupLauncher:
    """Scheduled backups through the same domain function as POST /backups."""

    def __init__(self, backups: BackupStarter, jobs: JobEngine) -> None:
        self.backups = backups
        self.jobs = jobs

    async def check(self, target: Target) -> None:
        if target.repository_id is None and target.policy_id is None:
            raise Invalid("invalid schedule", "repository_id: a backup schedule needs a repository_id or a "
                                              "policy_id", field="repository_id")

    async def start(self, vm: VmRef, target: Target) -> str:
        if target.backup_type == "auto":
            try:
                result = await self.backups.start(vm.vm_name, target.repository_id, "incremental",
                                                  policy_id=target.policy_id)
            except Invalid as e:
                # An incremental needs a completed previous backup in that repository; the first run is full.
                log.info("%s: incremental refused (%s); starting a full backup", vm.vm_name, e.details,
                         extra={"resource": vm.context_id})
                result = await self.backups.start(vm.vm_name, target.repository_id, "full",
                                                  policy_id=target.policy_id)
        else:
            result = await self.backups.start(vm.vm_name, target.repository_id, target.backup_type,
                                              policy_id=target.policy_id)
        job_id = _job_id(result)
        try:
            await self.jobs.get(job_id)  # the scheduler follows the job through its row: it must exist
        except NotFound as e:
            raise Internal("backup has no job row", f"backup {job_id} of {vm.vm_name!r} started, but no job "
                                                    f"{job_id} exists to follow") from e
        return job_id


class UnconnectedLauncher:
    """Stands in for an action whose service this omad does not have (yet): every start fails, clearly."""

    def __init__(self, action: str) -> None:
        self.action = action

    async def check(self, target: Target) -> None:
        if target.action == "backup" and target.repository_id is None and target.policy_id is None:
            raise Invalid("invalid schedule", "repository_id: a backup schedule needs a repository_id or a "
                                              "policy_id", field="repository_id")

    async def start(self, vm: VmRef, target: Target) -> str:
        raise Unavailable(f"{self.action} not available", f"this omad has no {self.action} service connected; "
                                                          f"the scheduled {self.action} of {vm.vm_name!r} "
                                                          "cannot start")
