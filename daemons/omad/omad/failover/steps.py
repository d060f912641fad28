"""Step jobs: a plan of named steps, each recorded before it runs, with what it produced; undone in reverse.

Every step is idempotent — it looks for what it would make (by a name derived from the job, or by CloudStack's
own state) before making it — and has an undo (or none, when it changes nothing). A step failing records
CloudStack's (or the agent's) text, then every step that ran is undone newest first and the job ends
`compensated` (or `failed`, when an undo failed too: leftovers to clean with cleanup-failed).

After omad died, `recover` looks at the job's records alone: a job that was compensating goes on compensating;
otherwise the first step not completed decides by its `on_crash` policy — RESUME runs it again and carries on,
COMPENSATE undoes it and everything before it. Never both, never neither.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from oma_common.errors import OmaError

from ..jobs.crashpoint import crash_if_named
from ..jobs.engine import JobEngine
from ..store import failover as store
from ..store.db import Database
from ..store.failover import FailoverJob, FailoverStatus, OnCrash, StepStatus

log = logging.getLogger(__name__)

Produced = dict[str, Any]


@dataclasses.dataclass
class Run:
    """A job as its steps see it: its record and what the steps before produced (merged, later wins)."""

    job: FailoverJob
    produced: Produced = dataclasses.field(default_factory=dict)
    db: Database | None = None
    seq: int = -1  # the step running now

    async def note(self, values: Produced) -> None:
        """Record now, before acting, what the running step must not forget (it is in `produced` on a resume)."""
        assert self.db is not None
        self.produced.update(values)
        async with self.db.transaction() as tx:
            await store.note_step(tx, self.job.job_id, self.seq, values)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Run], Awaitable[Produced]]
    undo: Callable[[Run], Awaitable[None]] | None = None
    on_crash: OnCrash = OnCrash.RESUME


# What a plan ends with once every step completed (the context's new status, the job ends): a callable, so
# the status lands in the same breath as the job's completion.
Finish = Callable[[Run], Awaitable[None]]
Compensated = Callable[[Run, bool], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: Sequence[Step]
    finish: Finish
    compensated: Compensated  # after the undo: True = everything undone


def error_text(e: BaseException) -> str:
    return str(e) if isinstance(e, OmaError) else f"{type(e).__name__}: {e}"


class Runner:
    def __init__(self, db: Database, jobs: JobEngine, crash_file: str = "") -> None:
        self.db = db
        self.jobs = jobs
        self.crash_file = Path(crash_file) if crash_file else None

    def _maybe_crash(self, job_id: str, name: str) -> None:
        """Fault injection for tests: when the crash file names this point (`<step>` right after the step is
        recorded, `ran:<step>` after it ran but before its outcome is recorded, `undo:<step>`), die as kill -9
        would (once)."""
        crash_if_named(self.crash_file, name, job_id)

    async def _load(self, job_id: str) -> tuple[Run, list[store.FailoverStep]]:
        job = await store.get(self.db, job_id)
        recorded = await store.steps(self.db, job_id)
        run = Run(job, db=self.db)
        if job.parent_job_id:  # an end test or a cleanup works on what its failover made
            for s in await store.steps(self.db, job.parent_job_id):
                run.produced.update(s.produced)
        for s in recorded:
            if s.status == StepStatus.COMPLETED or s.produced:
                run.produced.update(s.produced)
        return run, recorded

    async def execute(self, job_id: str, plan: Plan, start: int = 0) -> None:
        """Run the plan's steps from `start`; on a failure, undo and end the job."""
        run, _ = await self._load(job_id)
        total = len(plan.steps)
        for seq in range(start, total):
            step = plan.steps[seq]
            async with self.db.transaction() as tx:
                await store.begin_step(tx, job_id, seq, step.name, step.on_crash)
            await self.jobs.progress(job_id, 100.0 * seq / total, step.name)
            self._maybe_crash(job_id, step.name)
            run.seq = seq
            try:
                produced = await step.run(run)
            except Exception as e:
                text = error_text(e)
                if not isinstance(e, OmaError):
                    log.exception("failover step %s crashed", step.name, extra={"resource": job_id})
                log.warning("failover step %s failed: %s", step.name, text, extra={"resource": job_id})
                async with self.db.transaction() as tx:
                    await store.fail_step(tx, job_id, seq, text)
                    await store.start_compensating(tx, job_id, f"{step.name}: {text}")
                await self.compensate(job_id, plan, seq)
                return
            self._maybe_crash(job_id, f"ran:{step.name}")  # done in CloudStack, not yet recorded
            run.produced.update(produced)
            recorded = {s.seq: s.produced for s in await store.steps(self.db, job_id)}
            noted = {k: run.produced[k] for k in recorded.get(seq, {})}
            async with self.db.transaction() as tx:
                await store.complete_step(tx, job_id, seq, {**noted, **produced})
        await plan.finish(run)

    async def compensate(self, job_id: str, plan: Plan, upto: int) -> None:
        """Undo steps `upto` … 0 (those recorded), newest first; end the job compensated or failed."""
        run, recorded = await self._load(job_id)
        seen = {s.seq: s for s in recorded}
        async with self.db.transaction() as tx:
            await store.start_compensating(tx, job_id, None)
        for seq in range(min(upto, len(plan.steps) - 1), -1, -1):
            step, rec = plan.steps[seq], seen.get(seq)
            if rec is None or rec.status == StepStatus.COMPENSATED:
                continue
            async with self.db.transaction() as tx:
                await store.begin_undo(tx, job_id, seq)
            self._maybe_crash(job_id, f"undo:{step.name}")
            if step.undo is not None:
                try:
                    await step.undo(run)
                except Exception as e:
                    text = error_text(e)
                    log.warning("undoing failover step %s failed: %s", step.name, text, extra={"resource": job_id})
                    async with self.db.transaction() as tx:
                        await store.fail(tx, job_id, f"undoing {step.name} failed: {text}")
                    await plan.compensated(run, False)
                    await self._end_job(job_id)
                    return
            async with self.db.transaction() as tx:
                await store.complete_undo(tx, job_id, seq)
        async with self.db.transaction() as tx:
            await store.end_compensated(tx, job_id)
        await plan.compensated(run, True)
        await self._end_job(job_id)

    async def _end_job(self, job_id: str) -> None:
        job = await store.get(self.db, job_id)
        await self.jobs.finish(job_id, "failed", job.error_message or "failed")

    async def recover(self, job_id: str, plan: Plan) -> str:
        """Continue a job a dead omad left active, by its records; says what it did."""
        run, recorded = await self._load(job_id)
        if run.job.status == FailoverStatus.COMPENSATING:
            await self.compensate(job_id, plan, len(plan.steps) - 1)
            return "compensated"
        unfinished = next((s for s in recorded if s.status != StepStatus.COMPLETED), None)
        if unfinished is None:
            nxt = len(recorded)
            if nxt >= len(plan.steps):
                await plan.finish(run)
                return "finished"
            await self.execute(job_id, plan, nxt)
            return "resumed"
        step = plan.steps[unfinished.seq]
        if step.on_crash == OnCrash.RESUME:
            await self.execute(job_id, plan, unfinished.seq)
            return "resumed"
        async with self.db.transaction() as tx:
            await store.start_compensating(tx, job_id, f"{step.name}: interrupted by an omad restart")
        await self.compensate(job_id, plan, unfinished.seq)
        return "compensated"
