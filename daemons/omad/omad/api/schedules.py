"""/schedules: cron schedules in a time zone, enabling, running one now, and their executions."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import Conflict, Invalid, NotFound
from oma_common.schema import name_spec, spec, text_spec
from oma_common.web import Auth, Call, route

from ..schedule.scheduler import Scheduler
from ..schedule.schedules import Schedules

_CRON = ("6 fields, seconds first (second minute hour day-of-month month day-of-week), or the classic 5; "
         "*, a-b, */n, a-b/n, lists, JAN-DEC, SUN-SAT, ? in the day fields, @daily and friends")
BackupType = Literal["full", "incremental", "auto"]
ReplicationType = Literal["full", "incremental", "auto"]
Action = Literal["backup", "replication"]
_ACTION = ("what each run starts per VM; absent: replication when replication_type is given without repository_id "
           "or policy_id (the contract's schedule), else backup")
_REPLICATION_TYPE = ("for replication schedules: full copies every disk, incremental continues from the stored "
                     "change ids, auto (the default) is incremental once every disk has one")
ExecutionStatus = Literal["scheduled", "running", "completed", "failed", "skipped", "cancelled"]


@dataclasses.dataclass
class ScheduleIn:
    """A new schedule; each run backs up or replicates every enabled VM of the groups that use it."""

    name: str = name_spec(min_length=1, max_length=255)
    cron_expression: str = name_spec(min_length=1, max_length=255, description=_CRON, example="0 30 2 * * *")
    description: str = text_spec("", max_length=2000)
    timezone: str = name_spec("UTC", min_length=1, max_length=64, description="IANA time zone the expression is read "
                                                                         "in, e.g. Europe/Berlin")
    enabled: bool = spec(True)
    skip_if_running: bool = spec(True, description="a run that comes due while the previous one still runs is "
                                                   "recorded as skipped instead of started")
    max_concurrent_jobs: int = spec(10, min=1, max=1000, description="jobs of this schedule running at once")
    retry_attempts: int = spec(3, min=0, max=10, description="further attempts for a VM whose job failed")
    retry_delay_minutes: int = spec(10, min=0, max=1440, description="wait before each retry")
    action: Action | None = spec(None, description=_ACTION)
    backup_type: BackupType = spec("auto", description="auto: incremental when a previous backup allows it")
    repository_id: str | int | None = spec(None, max_length=128, description="repository the backups go to "
                                                                              "(backup schedules only)")
    policy_id: str | int | None = spec(None, max_length=128,
                                       description="backup policy to follow (instead of, or with, a repository)")
    replication_type: ReplicationType | None = spec(None, description=_REPLICATION_TYPE)
    created_by: str | None = name_spec(None, max_length=255, description="ignored: the authenticated user is recorded")


@dataclasses.dataclass
class ScheduleUpdate:
    """Fields to change; "" clears repository_id or policy_id."""

    name: str | None = name_spec(None, min_length=1, max_length=255)
    cron_expression: str | None = name_spec(None, min_length=1, max_length=255, description=_CRON)
    description: str | None = text_spec(None, max_length=2000)
    timezone: str | None = name_spec(None, min_length=1, max_length=64)
    enabled: bool | None = spec(None)
    skip_if_running: bool | None = spec(None)
    max_concurrent_jobs: int | None = spec(None, min=1, max=1000)
    retry_attempts: int | None = spec(None, min=0, max=10)
    retry_delay_minutes: int | None = spec(None, min=0, max=1440)
    action: Action | None = spec(None, description="a replication schedule takes no repository_id or policy_id")
    backup_type: BackupType | None = spec(None)
    repository_id: str | int | None = spec(None, max_length=128)
    policy_id: str | int | None = spec(None, max_length=128)
    replication_type: ReplicationType | None = spec(None, description=_REPLICATION_TYPE)


@dataclasses.dataclass
class EnableIn:
    enabled: bool = spec(True, description="false disables")


@dataclasses.dataclass
class ExecutionsQuery:
    limit: int = spec(50, min=1, max=1000)
    offset: int = spec(0, min=0, max=1_000_000_000)
    status: ExecutionStatus | None = spec(None)


@dataclasses.dataclass
class ScheduleRef:
    id: str
    name: str


@dataclasses.dataclass
class ExecutionOut:
    """One run of a schedule, with its counts."""

    id: int
    execution_id: int
    schedule_id: str
    scheduled_at: str
    started_at: str | None
    completed_at: str | None
    status: ExecutionStatus
    triggered_by: str
    late: bool
    missed_runs: int
    vms_eligible: int
    jobs_created: int
    jobs_completed: int
    jobs_failed: int
    jobs_skipped: int
    start_failures: int
    message: str | None


@dataclasses.dataclass
class ScheduleOut:
    id: str
    name: str
    description: str
    cron_expression: str
    timezone: str
    enabled: bool
    skip_if_running: bool
    max_concurrent_jobs: int
    retry_attempts: int
    retry_delay_minutes: int
    action: Action
    backup_type: BackupType
    replication_type: ReplicationType | None
    repository_id: str | None
    policy_id: str | None
    next_run_at: str | None
    last_run_at: str | None
    created_by: str
    created_at: str
    updated_at: str
    groups: list[ScheduleRef]
    group_count: int
    vm_count: int
    last_execution: ExecutionOut | None


@dataclasses.dataclass
class ScheduleList:
    schedules: list[ScheduleOut]
    count: int


@dataclasses.dataclass
class ExecutionList:
    schedule_id: str
    executions: list[ExecutionOut]
    count: int
    total: int
    limit: int
    offset: int


def _set(body: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(body).items() if v is not None}


def _execution_id(call: Call) -> int:
    text = call.params["execution_id"]
    if not text.isdigit() or len(text) > 18:
        raise Invalid("invalid execution id", f"{text!r} is not an execution id (a positive integer)")
    return int(text)


class SchedulesApi:
    def __init__(self, schedules: Schedules, scheduler: Scheduler) -> None:
        self.schedules = schedules
        self.scheduler = scheduler

    @route("GET", "/schedules", response=ScheduleList, tags=("schedules",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Every schedule with its groups, VM count, next run and latest execution."""
        items = await self.schedules.list()
        return {"schedules": items, "count": len(items)}

    @route("POST", "/schedules", errors=(NotFound, Conflict),
           body=ScheduleIn, response=ScheduleOut, status=201, auth=Auth.ADMIN,
           tags=("schedules",))
    async def create(self, call: Call) -> dict[str, Any]:
        """Create a schedule; a bad expression or time zone is a 400 naming the field."""
        fields = dataclasses.asdict(call.body)
        fields.pop("created_by")
        return await self.schedules.create(fields, actor=call.actor)

    @route("GET", "/schedules/{schedule_id}", errors=(NotFound,), response=ScheduleOut, tags=("schedules",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One schedule, with its next few run times (`upcoming_runs`)."""
        return await self.schedules.get(call.params["schedule_id"])

    @route("PUT", "/schedules/{schedule_id}", errors=(NotFound, Conflict),
           body=ScheduleUpdate, response=ScheduleOut, auth=Auth.ADMIN,
           tags=("schedules",))
    async def update(self, call: Call) -> dict[str, Any]:
        """Change a schedule; a new expression, time zone or enabling recomputes the next run."""
        return await self.schedules.update(call.params["schedule_id"], _set(call.body), actor=call.actor)

    @route("DELETE", "/schedules/{schedule_id}", errors=(NotFound, Conflict), auth=Auth.ADMIN, tags=("schedules",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Delete a schedule and its executions; its groups stay, without a schedule. 409 while it runs."""
        await self.schedules.delete(call.params["schedule_id"], actor=call.actor)
        return {"success": True, "message": f"schedule {call.params['schedule_id']} deleted"}

    @route("POST", "/schedules/{schedule_id}/enable", errors=(NotFound,),
           body=EnableIn, body_required=False, response=ScheduleOut, auth=Auth.ADMIN,
           tags=("schedules",))
    async def enable(self, call: Call) -> dict[str, Any]:
        """Enable (`{"enabled": true}`, the default) or disable a schedule."""
        return await self.schedules.set_enabled(call.params["schedule_id"], call.body.enabled, actor=call.actor)

    @route("POST", "/schedules/{schedule_id}/trigger", errors=(NotFound, Conflict),
           response=ExecutionOut, status=202, tags=("schedules",))
    async def trigger(self, call: Call) -> dict[str, Any]:
        """Run a schedule now; 409 while its previous run still runs and skip_if_running is on."""
        return await self.scheduler.trigger(call.params["schedule_id"], actor=call.actor)

    @route("GET", "/schedules/{schedule_id}/executions", errors=(NotFound,),
           query=ExecutionsQuery, response=ExecutionList,
           tags=("schedules",))
    async def executions(self, call: Call) -> dict[str, Any]:
        """A schedule's executions, newest first."""
        q: ExecutionsQuery = call.query
        return await self.schedules.executions(call.params["schedule_id"], limit=q.limit, offset=q.offset,
                                               status=q.status)

    @route("GET", "/schedules/{schedule_id}/executions/{execution_id}", errors=(NotFound,), tags=("schedules",),
           params={"execution_id": "[0-9]{1,18}"})
    async def execution(self, call: Call) -> dict[str, Any]:
        """One execution with its VMs (status, attempts, reason) and every job it created."""
        return await self.schedules.execution(call.params["schedule_id"], _execution_id(call))
