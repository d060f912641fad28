"""The scheduler on a fake clock: due times across DST, skip_if_running, concurrency limits while jobs are slow,
retries after the configured delay, a VM under two schedules without overlapping jobs, execution counts that
match the jobs, a missed run after downtime, restarts, and the VM's next_scheduled_at / last_scheduled_job_id;
starts outside the tick's lock: a bounded number at once, other schedules firing meanwhile, a failing start
among others, a stop, a disable or a delete while starts are in flight.

Jobs are real rows created through the JobEngine by a real in-process launcher; the test finishes them."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pytest

from oma_common.errors import Conflict, Invalid, Unavailable
from omad.schedule.clock import iso
from omad.store.db import Database

from ..lib.scheduling import Domain, FakeClock, add_contexts, build

pytestmark = pytest.mark.timeout(60)
UTC = timezone.utc
T0 = datetime(2025, 3, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def domain(db: Database) -> Domain:
    return build(db, FakeClock(T0), poll_seconds=5.0, late_after_seconds=60.0)


async def active_jobs_per_vm(d: Domain) -> Counter[str]:
    return Counter(j["vm_name"] for j in await d.launcher.running())


# -- when ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["0 30 2 * * *", "30 2 * * *"])
async def test_fires_at_the_right_instants_across_dst(domain: Domain, expr: str) -> None:
    d = domain
    ids = await add_contexts(d.db, ["vm1"])
    s = await d.schedule("nightly", expr, timezone="Europe/Berlin")
    await d.group("g", s["id"], [ids["vm1"]])
    fired = []
    for _ in range(4):
        fired.append(iso(await d.at_next_run(s["id"])))
        await d.launcher.finish_all()
        await d.scheduler.tick()
    assert fired == ["2025-03-29T01:30:00.000Z",  # 02:30 CET
                     "2025-03-30T01:00:00.000Z",  # 02:30 does not exist: 03:00 CEST, once
                     "2025-03-31T00:30:00.000Z",  # 02:30 CEST
                     "2025-04-01T00:30:00.000Z"]
    d.clock.set(datetime(2025, 10, 24, 12, tzinfo=UTC))
    await d.schedules.set_enabled(s["id"], False, actor="admin")
    await d.schedules.set_enabled(s["id"], True, actor="admin")  # next run counted from now
    fired = []
    for _ in range(3):
        fired.append(iso(await d.at_next_run(s["id"])))
        await d.launcher.finish_all()
        await d.scheduler.tick()
    assert fired == ["2025-10-25T00:30:00.000Z",  # 02:30 CEST
                     "2025-10-26T00:30:00.000Z",  # 02:30 happens twice: the first one only
                     "2025-10-27T01:30:00.000Z"]  # 02:30 CET
    runs = await d.executions(s["id"])
    assert [r["status"] for r in runs] == ["completed"] * 7 and not any(r["late"] for r in runs)
    assert [r["scheduled_at"] for r in runs[-3:]] == fired


async def test_the_loop_sleeps_on_the_clock_and_fires_on_time(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["vm1"])
    s = await d.schedule("every 10 min", "0 */10 * * * *")
    await d.group("g", s["id"], [ids["vm1"]])
    await d.scheduler.start()
    try:
        await d.scheduler.wait_ticks(1)
        assert await d.executions(s["id"]) == []
        d.clock.set(datetime(2025, 3, 28, 12, 10, tzinfo=UTC))  # the due time: the sleeping loop wakes
        await d.scheduler.wait_ticks(2)
        runs = await d.executions(s["id"])
        assert len(runs) == 1 and runs[0]["scheduled_at"] == "2025-03-28T12:10:00.000Z"
        assert runs[0]["jobs_created"] == 1 and not runs[0]["late"]
        await d.launcher.finish_all()
        d.clock.advance(seconds=5)  # the poll interval while an execution runs
        await d.scheduler.wait_ticks(3)
        assert (await d.executions(s["id"]))[0]["status"] == "completed"
    finally:
        await d.scheduler.stop()


# -- skip_if_running, limits, retries ----------------------------------------------------------------

async def test_skip_if_running_records_a_skipped_execution(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["a", "b"])
    s = await d.schedule("hourly", "0 0 * * * *", skip_if_running=True)
    await d.group("g", s["id"], list(ids.values()))
    await d.at_next_run(s["id"])
    await d.at_next_run(s["id"])  # the first run's jobs are still running
    first, second = await d.executions(s["id"])
    assert first["status"] == "running" and first["jobs_created"] == 2
    assert second["status"] == "skipped" and second["vms_eligible"] == 2 and second["jobs_skipped"] == 2
    assert second["jobs_created"] == 0 and f"execution {first['id']}" in second["message"]
    assert len(d.launcher.started) == 2
    with pytest.raises(Conflict, match="still running"):
        await d.scheduler.trigger(s["id"], actor="admin")

    # Without skip_if_running the next run starts, and its VMs wait for their running jobs to end.
    await d.schedules.update(s["id"], {"skip_if_running": False}, actor="admin")
    await d.at_next_run(s["id"])
    third = (await d.executions(s["id"]))[2]
    assert third["status"] == "running" and third["jobs_created"] == 0
    assert max((await active_jobs_per_vm(d)).values()) == 1
    await d.launcher.finish_all()
    await d.scheduler.tick()
    runs = await d.executions(s["id"])
    assert runs[0]["status"] == "completed" and runs[2]["jobs_created"] == 2
    assert max((await active_jobs_per_vm(d)).values()) == 1


async def test_concurrency_limits_hold_while_jobs_are_slow(domain: Domain) -> None:
    d = domain
    names = [f"vm{i:02d}" for i in range(30)]
    ids = await add_contexts(d.db, names)
    s = await d.schedule("big", "0 0 1 * * *", max_concurrent_jobs=6)
    limits = {"gold": 2, "silver": 3, "bronze": 10}
    members = {"gold": names[:8], "silver": names[8:18], "bronze": names[18:]}
    groups = {}
    for prio, (name, limit) in enumerate(limits.items()):
        groups[name] = await d.group(name, s["id"], [ids[n] for n in members[name]], max_concurrent_vms=limit,
                                     priority=prio * 10)
    group_of = {n: g for g, ns in members.items() for n in ns}
    rng = random.Random(7)
    await d.at_next_run(s["id"])
    peak = Counter[str]()
    for _ in range(200):
        running = await d.launcher.running()
        per_group = Counter(group_of[j["vm_name"]] for j in running)
        assert len(running) <= 6, running
        for g, n in per_group.items():
            assert n <= limits[g], (g, n)
            peak[g] = max(peak[g], n)
        peak["total"] = max(peak["total"], len(running))
        if not running and (await d.executions(s["id"]))[0]["status"] != "running":
            break
        for j in running:  # slow jobs: a few finish per tick
            if rng.random() < 0.3:
                await d.launcher.finish(j["id"])
        d.clock.advance(seconds=5)
        await d.scheduler.tick()
    run = (await d.executions(s["id"]))[0]
    assert run["status"] == "completed" and run["jobs_created"] == 30 == run["jobs_completed"]
    assert peak["total"] == 6 and peak["gold"] == 2 and peak["silver"] == 3  # the limits were reached, not passed
    started = [n for n, _, _ in d.launcher.started]
    assert sorted(started) == names  # every VM once
    assert set(started[:2]) <= set(members["gold"])  # the first group by priority starts first


async def test_retries_wait_the_configured_delay(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["flaky", "refused", "fine"])
    s = await d.schedule("retrying", "0 0 3 * * *", retry_attempts=2, retry_delay_minutes=7)
    await d.group("g", s["id"], list(ids.values()))
    d.launcher.refuse["refused"] = Unavailable("nbd-pool unavailable", "socket missing")
    due = await d.at_next_run(s["id"])
    for name, job_id, _ in d.launcher.started:
        await d.launcher.finish(job_id, "completed" if name == "fine" else "failed", "disk on fire")
    await d.scheduler.tick()
    attempts = {}
    for minute in (6, 7, 13, 14, 20, 21, 28):
        d.clock.set(due.replace(minute=minute, second=59 if minute in (6, 13, 20) else 0))
        await d.scheduler.tick()
        attempts[minute] = Counter(n for n, _, _ in d.launcher.started)["flaky"]
        for j in await d.launcher.running():
            await d.launcher.finish(j["id"], "failed", "disk on fire")
        await d.scheduler.tick()
    # The first attempt at 03:00; retries at 03:07 and 03:14 (7 minutes after each failure); then no more.
    assert attempts == {6: 1, 7: 2, 13: 2, 14: 3, 20: 3, 21: 3, 28: 3}
    run = (await d.executions(s["id"]))[0]
    detail = await d.schedules.execution(s["id"], run["id"])
    vms = {v["vm_name"]: v for v in detail["vms"]}
    assert vms["flaky"]["status"] == "failed" and vms["flaky"]["attempts"] == 3
    assert "disk on fire" in vms["flaky"]["reason"] and "after 3 attempts" in vms["flaky"]["reason"]
    assert vms["refused"]["status"] == "failed" and vms["refused"]["start_failures"] == 3
    assert "nbd-pool unavailable" in vms["refused"]["reason"]
    assert vms["fine"]["status"] == "completed" and vms["fine"]["attempts"] == 1
    assert (run["status"], run["jobs_created"], run["jobs_completed"], run["jobs_failed"], run["start_failures"]) \
        == ("failed", 4, 1, 3, 3)


# -- replication schedules ---------------------------------------------------------------------------

async def test_a_replication_schedule_skips_a_busy_vm_where_a_backup_schedule_waits(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["idle", "busy"])
    repl = await d.schedule("sync", "0 0 * * * *", action="replication", repository_id=None,
                            replication_type=None)
    backup = await d.schedule("backup", "0 0 * * * *", repository_id="1", skip_if_running=False)
    assert (repl["action"], repl["replication_type"]) == ("replication", "auto")  # detected per VM
    await d.group("replicated", repl["id"], list(ids.values()))
    await d.group("backed up", backup["id"], [ids["busy"]])
    busy_job = await d.engine.create("replication", display_name="manual replication", context_id=ids["busy"])
    await d.at_next_run(repl["id"])
    assert [(n, s) for n, _, s in d.replicator.started] == [("idle", repl["id"])]
    run = (await d.executions(repl["id"]))[0]
    detail = await d.schedules.execution(repl["id"], run["id"])
    vms = {v["vm_name"]: v for v in detail["vms"]}
    assert vms["busy"]["status"] == "skipped" and busy_job in vms["busy"]["reason"]
    assert vms["idle"]["status"] == "running"
    assert (run["jobs_created"], run["jobs_skipped"]) == (1, 1)
    waiting = await d.schedules.execution(backup["id"], (await d.executions(backup["id"]))[0]["id"])
    assert [(v["status"], v["reason"]) for v in waiting["vms"]] == [("pending", f"waiting: the VM is busy with "
                                                                                f"job {busy_job}")]
    await d.replicator.finish_all()
    await d.scheduler.tick()
    run = (await d.executions(repl["id"]))[0]
    assert (run["status"], run["jobs_completed"], run["jobs_skipped"]) == ("completed", 1, 1)
    assert run["message"] == "1 of 2 VM(s) protected, 0 failed, 1 skipped"


async def test_a_replication_refused_as_busy_by_its_domain_is_skipped(domain: Domain) -> None:
    """The domain's own per-VM check (a Conflict at start) counts as busy too: skipped, no attempt counted."""
    d = domain
    ids = await add_contexts(d.db, ["racing"])
    s = await d.schedule("sync", "0 0 * * * *", action="replication", repository_id=None,
                         replication_type="incremental", retry_attempts=3)
    await d.group("g", s["id"], list(ids.values()))
    d.replicator.refuse["racing"] = Conflict("replication running", "'racing' has a replication running (job-x)")
    await d.at_next_run(s["id"])
    run = (await d.executions(s["id"]))[0]
    detail = await d.schedules.execution(s["id"], run["id"])
    assert [(v["status"], v["attempts"], v["reason"]) for v in detail["vms"]] == \
        [("skipped", 0, "skipped: 'racing' has a replication running (job-x)")]
    assert (run["status"], run["jobs_created"], run["jobs_skipped"], run["start_failures"]) == ("skipped", 0, 1, 0)


async def test_replication_schedules_are_checked(domain: Domain) -> None:
    d = domain
    with pytest.raises(Invalid, match="^invalid schedule: repository_id: a replication schedule"):
        await d.schedule("r", "0 0 * * * *", action="replication", repository_id="1")
    # The contract's schedule (a replication_type, no repository): a replication schedule.
    s = await d.schedule("contract", "0 0 * * * *", action=None, repository_id=None, replication_type="full")
    assert (s["action"], s["replication_type"]) == ("replication", "full")
    b = await d.schedule("b", "0 0 * * * *", action=None, replication_type="full")  # with a repository: backups
    assert b["action"] == "backup"
    with pytest.raises(Invalid, match="repository_id"):
        await d.schedules.update(b["id"], {"action": "replication"}, actor="admin")
    changed = await d.schedules.update(b["id"], {"action": "replication", "repository_id": ""}, actor="admin")
    assert (changed["action"], changed["repository_id"], changed["replication_type"]) == ("replication", None, "full")


# -- one VM, two schedules ---------------------------------------------------------------------------

async def test_a_vm_in_two_groups_with_two_schedules_gets_both_without_overlap(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["shared", "only-a", "only-b"])
    a = await d.schedule("A", "0 0 * * * *")
    b = await d.schedule("B", "0 0 */2 * * *")  # due at the same instants every other hour
    await d.group("ga", a["id"], [ids["shared"], ids["only-a"]])
    await d.group("gb", b["id"], [ids["shared"], ids["only-b"]])
    ctx = await d.db.fetchone("SELECT next_scheduled_at FROM vm_replication_contexts WHERE vm_name = 'shared'")
    assert ctx["next_scheduled_at"] == "2025-03-28T13:00:00.000Z"
    d.clock.set(datetime(2025, 3, 28, 14, tzinfo=UTC))  # both due now
    await d.scheduler.tick()
    for _ in range(6):
        per_vm = await active_jobs_per_vm(d)
        assert max(per_vm.values(), default=0) <= 1, per_vm
        for j in await d.launcher.running():
            await d.launcher.finish(j["id"])
        d.clock.advance(seconds=5)
        await d.scheduler.tick()
    shared = [sched for name, _, sched in d.launcher.started if name == "shared"]
    assert sorted(shared) == sorted([a["id"], b["id"]])  # protected by both
    for sched in (a, b):
        run = (await d.executions(sched["id"]))[-1]
        assert run["status"] == "completed" and run["jobs_completed"] == 2
    jobs = await d.db.fetchall("SELECT j.started_at, j.completed_at FROM jobs j JOIN vm_replication_contexts c "
                               "ON c.context_id = j.context_id WHERE c.vm_name = 'shared' ORDER BY j.started_at")
    assert jobs[0]["completed_at"] <= jobs[1]["started_at"]  # one after the other

    # In two groups of the SAME schedule, a VM runs once per execution (in its first group by priority).
    await d.group("ga2", a["id"], [ids["shared"]], priority=0)
    d.launcher.started.clear()
    await d.at_next_run(a["id"])
    assert Counter(n for n, _, _ in d.launcher.started) == {"shared": 1, "only-a": 1}
    run = (await d.executions(a["id"]))[-1]
    assert run["vms_eligible"] == 2


# -- counts, downtime, restarts, VM columns ----------------------------------------------------------

async def test_execution_counts_match_the_jobs(domain: Domain) -> None:
    d = domain
    names = ["a-ok", "b-ok", "c-bad", "d-refused", "e-gone", "f-later"]  # start order: by name
    ids = await add_contexts(d.db, names)
    s = await d.schedule("mixed", "0 0 4 * * *", max_concurrent_jobs=3)
    g = await d.group("g", s["id"], [ids[n] for n in names])
    d.launcher.refuse["d-refused"] = Invalid("no repository", "repository 1 does not exist")
    await d.at_next_run(s["id"])  # a, b, c start; the others wait for a slot
    assert [n for n, _, _ in d.launcher.started] == names[:3]
    await d.groups.remove_vm(g["id"], ids["e-gone"], actor="admin")
    for name, job_id, _ in d.launcher.started:
        await d.launcher.finish(job_id, "failed" if name == "c-bad" else "completed", "boom")
    await d.scheduler.tick()  # d refused, e skipped (left the group), f starts
    await d.launcher.finish_all()
    await d.scheduler.tick()
    run = (await d.executions(s["id"]))[0]
    rows = await d.db.fetchall("SELECT j.status FROM schedule_execution_jobs x JOIN jobs j ON j.id = x.job_id "
                               "WHERE x.execution_id = ?", (run["id"],))
    statuses = Counter(r["status"] for r in rows)
    assert run["status"] == "failed"
    assert run["vms_eligible"] == 6
    assert run["jobs_created"] == len(d.launcher.started) == sum(statuses.values()) == 4
    assert run["jobs_completed"] == statuses["completed"] == 3
    assert run["jobs_failed"] == statuses["failed"] == 1
    assert run["jobs_skipped"] == 1 and run["start_failures"] == 1
    assert run["message"] == "3 of 6 VM(s) protected, 2 failed, 1 skipped"
    detail = await d.schedules.execution(s["id"], run["id"])
    assert {j["job_id"] for j in detail["jobs"]} == {j for _, j, _ in d.launcher.started}
    assert {v["vm_name"]: v["status"] for v in detail["vms"]} == {
        "a-ok": "completed", "b-ok": "completed", "c-bad": "failed", "d-refused": "failed", "e-gone": "skipped",
        "f-later": "completed"}


async def test_a_run_missed_while_down_runs_once_and_late(db: Database) -> None:
    clock = FakeClock(T0)
    d = build(db, clock)
    ids = await add_contexts(db, ["vm1", "vm2"])
    s = await d.schedule("hourly", "0 0 * * * *", max_concurrent_jobs=1)
    await d.group("g", s["id"], list(ids.values()))
    await d.at_next_run(s["id"])  # 13:00: vm1 runs, vm2 waits for the slot

    # omad stops at 13:00:30 and comes back at 17:20: a new scheduler on the same database.
    clock.set(datetime(2025, 3, 28, 17, 20, tzinfo=UTC))
    d2 = build(db, clock)
    await d2.engine.recover()  # as omad does before the scheduler starts: the dead run's job is failed
    await d2.scheduler.start()
    try:
        await d2.scheduler.wait_ticks(1)
        runs = await d2.executions(s["id"])
        assert [r["scheduled_at"] for r in runs] == ["2025-03-28T13:00:00.000Z", "2025-03-28T14:00:00.000Z"]
        late = runs[1]
        assert late["late"] and late["missed_runs"] == 3 and late["triggered_by"] == "scheduler"
        assert late["started_at"] == "2025-03-28T17:20:00.000Z"
        assert (await d2.schedules.get(s["id"]))["next_run_at"] == "2025-03-28T18:00:00.000Z"
        # The interrupted run carried on: its failed job is counted and vm2 got its turn.
        first = await d2.schedules.execution(s["id"], runs[0]["id"])
        assert {v["vm_name"]: v["status"] for v in first["vms"]} == {"vm1": "failed", "vm2": "running"}
        assert first["jobs_failed"] == 1 and "interrupted" in first["vms"][0]["reason"]
    finally:
        await d2.scheduler.stop()


async def test_vm_columns_follow_the_schedules(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["vm1", "vm2"])

    async def vm(name: str) -> dict[str, str | None]:
        row = await d.db.fetchone("SELECT next_scheduled_at, last_scheduled_job_id FROM vm_replication_contexts "
                                  "WHERE vm_name = ?", (name,))
        assert row is not None
        return row

    daily = await d.schedule("daily", "0 0 22 * * *")
    hourly = await d.schedule("hourly", "0 30 * * * *", enabled=False)
    g1 = await d.group("g1", daily["id"], [ids["vm1"]])
    g2 = await d.group("g2", None, [ids["vm1"], ids["vm2"]])
    assert (await vm("vm1"))["next_scheduled_at"] == "2025-03-28T22:00:00.000Z"
    assert (await vm("vm2"))["next_scheduled_at"] is None
    await d.groups.update(g2["id"], {"schedule_id": hourly["id"]}, actor="admin")
    assert (await vm("vm2"))["next_scheduled_at"] is None  # the hourly schedule is disabled
    await d.schedules.set_enabled(hourly["id"], True, actor="admin")
    assert (await vm("vm1"))["next_scheduled_at"] == "2025-03-28T12:30:00.000Z"  # the earlier of both
    await d.at_next_run(hourly["id"])
    assert (await vm("vm1"))["next_scheduled_at"] == "2025-03-28T13:30:00.000Z"
    jobs = {n: j for n, j, _ in d.launcher.started}
    assert (await vm("vm1"))["last_scheduled_job_id"] == jobs["vm1"]
    assert (await vm("vm2"))["last_scheduled_job_id"] == jobs["vm2"]
    await d.groups.update(g2["id"], {"schedule_id": ""}, actor="admin")
    assert (await vm("vm2"))["next_scheduled_at"] is None
    assert (await vm("vm1"))["next_scheduled_at"] == "2025-03-28T22:00:00.000Z"
    await d.groups.delete(g1["id"], actor="admin")
    assert (await vm("vm1"))["next_scheduled_at"] is None
    await d.db.execute("UPDATE vm_replication_contexts SET scheduler_enabled = 0 WHERE vm_name = 'vm2'")
    await d.groups.update(g2["id"], {"schedule_id": daily["id"]}, actor="admin")
    assert (await vm("vm2"))["next_scheduled_at"] is None  # the VM is excluded from scheduling


async def test_disabling_stops_starting_and_manual_runs(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["a", "b", "c"])
    s = await d.schedule("slow", "0 0 5 * * *", max_concurrent_jobs=1)
    await d.group("g", s["id"], list(ids.values()))
    await d.at_next_run(s["id"])
    assert len(d.launcher.started) == 1
    await d.schedules.set_enabled(s["id"], False, actor="admin")
    await d.launcher.finish_all()
    await d.scheduler.tick()
    run = (await d.executions(s["id"]))[0]
    assert (run["status"], run["jobs_completed"], run["jobs_skipped"]) == ("completed", 1, 2)
    assert len(d.launcher.started) == 1 and (await d.schedules.get(s["id"]))["next_run_at"] is None

    manual = await d.scheduler.trigger(s["id"], actor="alice")  # a disabled schedule still runs by hand
    assert manual["triggered_by"] == "manual:alice" and manual["status"] == "running"
    await d.scheduler.tick()
    assert len(d.launcher.started) == 2
    with pytest.raises(Conflict):
        await d.schedules.delete(s["id"], actor="admin")  # running
    for _ in range(3):
        await d.launcher.finish_all()
        await d.scheduler.tick()
    assert (await d.executions(s["id"]))[-1]["jobs_completed"] == 3
    await d.schedules.delete(s["id"], actor="admin")
    assert (await d.groups.list())[0]["schedule_id"] is None  # the group stays, unscheduled


async def test_disabling_drops_the_retries_of_a_run_started_by_hand(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, ["a"])
    s = await d.schedule("by hand", "0 0 5 * * *", retry_attempts=2, retry_delay_minutes=1)
    await d.group("g", s["id"], list(ids.values()))
    run = await d.scheduler.trigger(s["id"], actor="alice")
    await d.scheduler.tick()
    [(_, job_id, _)] = d.launcher.started
    await d.schedules.set_enabled(s["id"], False, actor="admin")  # while a's job runs
    await d.launcher.finish(job_id, "failed", "the VMA lost the datastore")
    for _ in range(2):  # the failure is seen, then the retry delay passes
        d.clock.advance(minutes=30)
        await d.scheduler.tick()
    assert len(d.launcher.started) == 1  # like a scheduled run's, its failed VM is not retried
    detail = await d.schedules.execution(s["id"], run["id"])
    assert (detail["status"], detail["jobs_created"], detail["jobs_failed"]) == ("failed", 1, 1)
    [a] = detail["vms"]
    assert a["status"] == "failed" and "not retried (the schedule is disabled)" in a["reason"]

    # A disabled schedule run by hand starts each VM once, and retries nothing either.
    again = await d.scheduler.trigger(s["id"], actor="alice")
    await d.scheduler.tick()
    await d.launcher.finish(d.launcher.started[-1][1], "failed", "the VMA lost the datastore")
    for _ in range(2):
        d.clock.advance(minutes=30)
        await d.scheduler.tick()
    assert len(d.launcher.started) == 2
    [a] = (await d.schedules.execution(s["id"], again["id"]))["vms"]
    assert a["status"] == "failed" and "not retried (the schedule is disabled)" in a["reason"]


async def test_no_eligible_vms_is_a_skipped_run(domain: Domain) -> None:
    d = domain
    s = await d.schedule("empty", "0 0 6 * * *")
    await d.at_next_run(s["id"])
    run = (await d.executions(s["id"]))[0]
    assert run["status"] == "skipped" and run["vms_eligible"] == 0 and "no enabled VM" in run["message"]


async def test_trigger_and_tick_do_not_interleave(domain: Domain) -> None:
    d = domain
    ids = await add_contexts(d.db, [f"vm{i}" for i in range(20)])
    s = await d.schedule("now", "0 0 7 * * *", skip_if_running=False, max_concurrent_jobs=20)
    await d.group("g", s["id"], list(ids.values()), max_concurrent_vms=20)
    await asyncio.gather(d.scheduler.trigger(s["id"], actor="a"), d.scheduler.tick(),
                         d.scheduler.trigger(s["id"], actor="b"), d.scheduler.tick())
    await d.scheduler.tick()
    per_vm = await active_jobs_per_vm(d)
    assert len(per_vm) == 20 and max(per_vm.values()) == 1


async def test_stop_lets_the_starts_in_progress_finish_and_starts_nothing_more(db: Database) -> None:
    d = build(db, FakeClock(T0), start_concurrency=2)
    ids = await add_contexts(d.db, ["a", "b", "c", "d"])
    s = await d.schedule("slow starts", "0 0 8 * * *")
    await d.group("g", s["id"], list(ids.values()))
    d.launcher.gate = asyncio.Event()
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    await d.scheduler.start()
    await d.launcher.wait_in_flight(2)  # the loop is inside the first two starts; the others wait for a slot
    stopping = asyncio.ensure_future(d.scheduler.stop())
    await asyncio.sleep(0)  # stop() has asked the loop to end
    d.launcher.gate.set()
    await stopping
    detail = await d.schedules.execution(s["id"], (await d.executions(s["id"]))[0]["id"])
    assert [(v["vm_name"], v["status"]) for v in detail["vms"]] == [("a", "running"), ("b", "running"),
                                                                   ("c", "pending"), ("d", "pending")]
    assert sorted(j["job_id"] for j in detail["jobs"]) == sorted(j for _, j, _ in d.launcher.started)
    assert len(d.launcher.started) == 2  # the started jobs are recorded, and nothing more started

    # The next omad starts the VMs left waiting, and only those.
    again = build(db, FakeClock(datetime(2025, 3, 29, 8, 1, tzinfo=UTC)), start_concurrency=2)
    assert (await again.scheduler.tick()).started == 2
    assert sorted(n for n, _, _ in again.launcher.started) == ["c", "d"]
    assert Counter((await active_jobs_per_vm(again)).values()) == {1: 4}


# -- starts outside the tick's lock ------------------------------------------------------------------

async def test_a_schedules_vms_start_at_once_within_the_setting(db: Database) -> None:
    d = build(db, FakeClock(T0), start_concurrency=3)
    names = [f"vm{i}" for i in range(8)]
    ids = await add_contexts(d.db, names)
    s = await d.schedule("slow starts", "0 0 8 * * *", max_concurrent_jobs=10)
    await d.group("g", s["id"], list(ids.values()))
    d.launcher.gate = asyncio.Event()
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    ticking = asyncio.ensure_future(d.scheduler.tick())
    await d.launcher.wait_in_flight(3)  # three starts overlap ...
    for _ in range(20):
        await asyncio.sleep(0)
    assert d.launcher.in_flight == 3 and not ticking.done()  # ... and no more: the others wait for a slot
    d.launcher.gate.set()
    report = await ticking
    assert report.started == 8 and d.launcher.most_in_flight == 3
    run = (await d.executions(s["id"]))[0]
    assert (run["status"], run["jobs_created"]) == ("running", 8)
    assert sorted(n for n, _, _ in d.launcher.started) == names


async def slow_replication_and_a_backup(d: Domain) -> tuple[dict[str, Any], dict[str, Any]]:
    """A replication schedule of r1, r2 due at 08:00 whose starts hang on `d.replicator.gate` (CloudStack creating
    volumes) and a backup schedule of b1 due at 08:05; returns both schedules."""
    ids = await add_contexts(d.db, ["r1", "r2", "b1"])
    repl = await d.schedule("sync", "0 0 8 * * *", action="replication", repository_id=None)
    backup = await d.schedule("backup", "0 5 8 * * *")
    await d.group("replicated", repl["id"], [ids["r1"], ids["r2"]])
    await d.group("backed up", backup["id"], [ids["b1"]])
    d.replicator.gate = asyncio.Event()
    return repl, backup


async def test_another_schedule_ticks_while_a_schedules_starts_are_in_flight(domain: Domain) -> None:
    d = domain
    repl, _ = await slow_replication_and_a_backup(d)
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    first = asyncio.ensure_future(d.scheduler.tick())
    await d.replicator.wait_in_flight(2)
    d.clock.set(datetime(2025, 3, 29, 8, 5, tzinfo=UTC))
    report = await asyncio.wait_for(d.scheduler.tick(), 10)  # not held up by the replications' starts
    assert (report.fired, report.started) == (1, 1) and [n for n, _, _ in d.launcher.started] == ["b1"]
    run = (await d.executions(repl["id"]))[0]
    assert run["jobs_created"] == 0 and d.replicator.in_flight == 2  # still starting
    detail = await d.schedules.execution(repl["id"], run["id"])
    assert {v["status"] for v in detail["vms"]} == {"pending"}
    d.replicator.gate.set()
    assert (await first).started == 2
    run = (await d.executions(repl["id"]))[0]
    assert (run["status"], run["jobs_created"]) == ("running", 2)


async def test_the_loop_fires_another_schedule_while_a_schedules_starts_are_in_flight(domain: Domain) -> None:
    d = domain
    repl, backup = await slow_replication_and_a_backup(d)
    d.clock.set(datetime(2025, 3, 29, 7, 59, tzinfo=UTC))
    await d.scheduler.start()
    try:
        d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
        await d.replicator.wait_in_flight(2)
        d.clock.set(datetime(2025, 3, 29, 8, 5, tzinfo=UTC))  # the backup is due ...
        d.scheduler.wake()  # ... (and the fake clock's sleeper may not be registered yet)
        await asyncio.wait_for(d.launcher.entered.wait(), 10)
        assert d.replicator.in_flight == 2 and not d.replicator.started
    finally:
        d.replicator.gate.set()
        await d.scheduler.stop()
    assert [n for n, _, _ in d.launcher.started] == ["b1"]
    assert sorted(n for n, _, _ in d.replicator.started) == ["r1", "r2"]
    runs = [(await d.executions(s["id"]))[0] for s in (repl, backup)]
    assert [(r["status"], r["jobs_created"]) for r in runs] == [("running", 2), ("running", 1)]


async def running_attempts_not_followed(d: Domain) -> list[dict[str, Any]]:
    """Attempt rows `running` whose VM does not follow that job: no tick would ever end them."""
    return await d.db.fetchall(
        "SELECT x.job_id, x.vm_context_id FROM schedule_execution_jobs x LEFT JOIN schedule_execution_vms v "
        "ON v.execution_id = x.execution_id AND v.vm_context_id = x.vm_context_id AND v.job_id = x.job_id "
        "AND v.status = 'running' WHERE x.status = 'running' AND v.job_id IS NULL")


async def test_disabling_a_schedule_drops_its_starts_waiting_for_a_slot(db: Database) -> None:
    d = build(db, FakeClock(T0), start_concurrency=3)
    ids = await add_contexts(d.db, ["a", "b", "c", "d", "e"])
    s = await d.schedule("slow starts", "0 0 8 * * *", max_concurrent_jobs=10, retry_attempts=2)
    await d.group("g", s["id"], list(ids.values()))
    d.launcher.gate = asyncio.Event()
    d.launcher.refuse["b"] = Unavailable("repository unavailable", "the repository is not mounted")
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    ticking = asyncio.ensure_future(d.scheduler.tick())
    await d.launcher.wait_in_flight(3)  # a, b and c have begun; d and e wait for a slot
    other = d.engine.new("backup", display_name="a manual backup", context_id=ids["c"])
    await d.engine.create_many([other])  # c gets a job of its own meanwhile: its start is refused as busy

    # The disable does not wait for the starts in progress (their gate is still closed).
    await asyncio.wait_for(d.schedules.set_enabled(s["id"], False, actor="admin"), 5)
    run_id = (await d.executions(s["id"]))[0]["id"]
    vms = {v["vm_name"]: v for v in (await d.schedules.execution(s["id"], run_id))["vms"]}
    assert {n: v["status"] for n, v in vms.items()} == {"a": "pending", "b": "pending", "c": "pending", "d": "skipped",
                                                       "e": "skipped"}
    assert vms["e"]["reason"] == "cancelled: the schedule was disabled by admin"

    d.launcher.gate.set()
    await ticking
    assert [n for n, _, _ in d.launcher.started] == ["a"]  # d and e never began
    detail = await d.schedules.execution(s["id"], run_id)
    vms = {v["vm_name"]: v for v in detail["vms"]}
    # a's start went through: the run follows its job and counts it; the refused start is recorded with its
    # reason and not retried; the VM refused as busy does not wait for a disabled schedule.
    assert {n: v["status"] for n, v in vms.items()} == {"a": "running", "b": "failed", "c": "skipped", "d": "skipped",
                                                       "e": "skipped"}
    assert "the repository is not mounted" in vms["b"]["reason"]
    assert "not retried" in vms["b"]["reason"] and vms["b"]["start_failures"] == 1
    assert vms["c"]["reason"].startswith("cancelled: the schedule was disabled by admin; ")
    assert [(j["job_id"], j["status"]) for j in detail["jobs"]] == [(d.launcher.started[0][1], "running")]
    assert (detail["status"], detail["jobs_created"], detail["start_failures"]) == ("running", 1, 1)

    await d.launcher.finish(d.launcher.started[0][1], "failed", "the VMA lost the datastore")
    d.clock.advance(hours=1)  # past any retry delay
    await d.scheduler.tick()
    await d.scheduler.tick()
    assert len(d.launcher.started) == 1  # a disabled schedule's run retries nothing
    run = await d.schedules.execution(s["id"], run_id)
    assert (run["status"], run["jobs_created"], run["jobs_completed"], run["jobs_failed"], run["jobs_skipped"]) == \
        ("failed", 1, 0, 1, 3)
    assert [j["status"] for j in run["jobs"]] == ["failed"]
    a = next(v for v in run["vms"] if v["vm_name"] == "a")
    assert a["status"] == "failed" and "not retried (the schedule is disabled)" in a["reason"]
    assert not await running_attempts_not_followed(d)


async def test_deleting_a_schedule_while_its_starts_are_in_flight(db: Database) -> None:
    d = build(db, FakeClock(T0), start_concurrency=1)
    ids = await add_contexts(d.db, ["a", "b"])
    s = await d.schedule("slow starts", "0 0 8 * * *", max_concurrent_jobs=10)
    await d.group("g", s["id"], list(ids.values()))
    d.launcher.gate = asyncio.Event()
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    ticking = asyncio.ensure_future(d.scheduler.tick())
    await d.launcher.wait_in_flight(1)
    await d.schedules.set_enabled(s["id"], False, actor="admin")
    await d.scheduler.tick()  # b (not begun) is skipped; a's start keeps the run open
    with pytest.raises(Conflict):
        await d.schedules.delete(s["id"], actor="admin")
    d.launcher.gate.set()
    await ticking
    await d.scheduler.tick()
    with pytest.raises(Conflict):  # a's job runs, followed by the run
        await d.schedules.delete(s["id"], actor="admin")
    assert not await running_attempts_not_followed(d)
    [(name, job_id, _)] = d.launcher.started
    assert name == "a"
    await d.launcher.finish(job_id)
    await d.scheduler.tick()
    run = (await d.executions(s["id"]))[0]
    assert (run["status"], run["jobs_created"], run["jobs_completed"], run["jobs_skipped"]) == ("completed", 1, 1, 1)
    await d.schedules.delete(s["id"], actor="admin")
    assert await d.db.scalar("SELECT COUNT(*) FROM schedule_execution_jobs") == 0
    assert await d.db.scalar("SELECT status FROM jobs WHERE id = ?", (job_id,)) == "completed"


async def test_stopping_after_a_disable_records_the_starts_in_progress(db: Database) -> None:
    d = build(db, FakeClock(T0), start_concurrency=1)
    ids = await add_contexts(d.db, ["a", "b"])
    s = await d.schedule("slow starts", "0 0 8 * * *", max_concurrent_jobs=10)
    await d.group("g", s["id"], list(ids.values()))
    d.launcher.gate = asyncio.Event()
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    await d.scheduler.start()
    await d.launcher.wait_in_flight(1)
    await d.schedules.set_enabled(s["id"], False, actor="admin")
    stopping = asyncio.ensure_future(d.scheduler.stop())
    await asyncio.sleep(0)
    d.launcher.gate.set()
    await stopping
    detail = await d.schedules.execution(s["id"], (await d.executions(s["id"]))[0]["id"])
    assert [(v["vm_name"], v["status"]) for v in detail["vms"]] == [("a", "running"), ("b", "skipped")]
    assert [j["status"] for j in detail["jobs"]] == ["running"]

    # The next omad follows a's job and starts nothing for the disabled schedule.
    again = build(db, FakeClock(datetime(2025, 3, 29, 8, 1, tzinfo=UTC)), start_concurrency=1)
    await again.launcher.finish_all()
    assert (await again.scheduler.tick()).started == 0
    run = (await again.executions(s["id"]))[0]
    assert (run["status"], run["jobs_completed"], run["jobs_skipped"]) == ("completed", 1, 1)


async def test_a_failing_start_does_not_stop_the_others(db: Database) -> None:
    d = build(db, FakeClock(T0), start_concurrency=2)
    names = ["a", "refused", "b", "broken", "c"]
    ids = await add_contexts(d.db, names)
    s = await d.schedule("sync", "0 0 8 * * *", action="replication", repository_id=None, max_concurrent_jobs=10)
    await d.group("g", s["id"], list(ids.values()))
    d.replicator.gate = asyncio.Event()
    d.replicator.gate.set()
    d.replicator.refuse["refused"] = Unavailable("CloudStack unavailable", "createVolume timed out")
    d.replicator.refuse["broken"] = KeyError("a launcher bug")
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    report = await d.scheduler.tick()
    assert report.started == 3 and sorted(n for n, _, _ in d.replicator.started) == ["a", "b", "c"]
    run = (await d.executions(s["id"]))[0]
    detail = await d.schedules.execution(s["id"], run["id"])
    vms = {v["vm_name"]: v for v in detail["vms"]}
    assert {n: v["status"] for n, v in vms.items()} == {"a": "running", "refused": "failed", "b": "running",
                                                       "broken": "failed", "c": "running"}
    assert "createVolume timed out" in vms["refused"]["reason"]
    assert "failed unexpectedly" in vms["broken"]["reason"]
    assert (run["jobs_created"], run["start_failures"]) == (3, 2)


async def test_a_tick_starting_a_thousand_vms_writes_in_a_few_batched_transactions(
        domain: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    d = domain
    ids = list((await add_contexts(d.db, [f"vm{i:04d}" for i in range(1000)])).values())
    schedules = [await d.schedule(f"s{i}", f"{i} 0 9 * * *", max_concurrent_jobs=1000) for i in range(4)]
    for g in range(10):
        await d.group(f"g{g}", schedules[g % 4]["id"], ids[g * 100:(g + 1) * 100], max_concurrent_vms=100)
    transactions = 0
    begin = d.db.transaction

    def counted() -> Any:
        nonlocal transactions
        transactions += 1
        return begin()

    monkeypatch.setattr(d.db, "transaction", counted)
    d.clock.set(datetime(2025, 3, 29, 9, 0, 30, tzinfo=UTC))
    report = await d.scheduler.tick()
    assert (report.fired, report.started) == (4, 1000)
    # Firing, collecting, the jobs (one batch: one launcher), the round's record, the counts: not one per VM.
    assert transactions <= 6, transactions
    assert await d.db.scalar("SELECT COUNT(*) FROM jobs WHERE status = 'running'") == 1000
    rows = await d.db.fetchall("SELECT v.status, v.job_id, x.status AS attempt, j.context_id FROM "
                               "schedule_execution_vms v JOIN schedule_execution_jobs x ON x.job_id = v.job_id "
                               "JOIN jobs j ON j.id = v.job_id AND j.context_id = v.vm_context_id")
    assert len(rows) == 1000 and {(r["status"], r["attempt"]) for r in rows} == {("running", "running")}
    runs = [(await d.executions(s["id"]))[0] for s in schedules]
    assert sum(r["jobs_created"] for r in runs) == 1000


# -- recording the starts' outcomes ------------------------------------------------------------------

# The disk fills up as the scheduler records started jobs: the write that makes a VM follow its job fails, as
# SQLite fails it (the rest of the database still answers). Dropped when the space is freed.
DISK_FULL = ("CREATE TRIGGER disk_full BEFORE UPDATE OF status ON schedule_execution_vms WHEN NEW.status = 'running' "
             "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Return once a record containing `text` is logged."""
    while not any(text in r.getMessage() for r in caplog.records):
        await asyncio.sleep(0.01)


async def due_with_the_disk_full(db: Database, *pauses: float) -> tuple[Domain, dict[str, Any]]:
    """A backup schedule of a and b, due now, and a full disk; the scheduler pauses `pauses` between tries."""
    d = build(db, FakeClock(T0), record_retry_seconds=pauses)
    ids = await add_contexts(d.db, ["a", "b"])
    s = await d.schedule("nightly", "0 0 8 * * *")
    await d.group("g", s["id"], list(ids.values()))
    await d.db.execute(DISK_FULL)
    d.clock.set(datetime(2025, 3, 29, 8, tzinfo=UTC))
    return d, s


async def test_a_recording_that_fails_is_tried_again(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    d, s = await due_with_the_disk_full(db, 0.5, 0.5)
    with caplog.at_level(logging.WARNING, logger="omad.schedule.scheduler"):
        ticking = asyncio.ensure_future(d.scheduler.tick())
        await asyncio.wait_for(logged(caplog, "could not be recorded"), 10)
        await d.db.execute("DROP TRIGGER disk_full")  # space freed before the next try
        report = await ticking
    run = (await d.executions(s["id"]))[0]
    failure = next(r.getMessage() for r in caplog.records if "could not be recorded" in r.getMessage())
    assert "'nightly'" in failure and f"execution {run['id']}" in failure and "database or disk is full" in failure
    assert report.started == 2 and (run["status"], run["jobs_created"]) == ("running", 2)
    detail = await d.schedules.execution(s["id"], run["id"])
    jobs = {name: job_id for name, job_id, _ in d.launcher.started}
    assert {v["vm_name"]: (v["status"], v["job_id"]) for v in detail["vms"]} == \
        {"a": ("running", jobs["a"]), "b": ("running", jobs["b"])}
    assert sorted(j["job_id"] for j in detail["jobs"]) == sorted(jobs.values())


async def test_outcomes_that_cannot_be_recorded_are_kept_until_they_can(db: Database,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    d, s = await due_with_the_disk_full(db, 0.01)
    with caplog.at_level(logging.WARNING, logger="omad.schedule.scheduler"):
        await d.scheduler.tick()
    run = (await d.executions(s["id"]))[0]
    given_up = [r for r in caplog.records if r.levelno == logging.ERROR and "could not be recorded" in r.getMessage()]
    assert given_up and "'nightly'" in given_up[0].getMessage() and f"execution {run['id']}" in given_up[0].getMessage()
    jobs = {name: job_id for name, job_id, _ in d.launcher.started}
    assert sorted(jobs) == ["a", "b"]

    # While the database refuses, the VMs are not started again, neither while their jobs run nor once they end.
    d.clock.advance(seconds=5)
    await d.scheduler.tick()
    await d.launcher.finish(jobs["a"])
    await d.launcher.finish(jobs["b"], "failed", "the VMA lost the datastore")
    d.clock.advance(seconds=5)
    await d.scheduler.tick()
    assert len(d.launcher.started) == 2
    assert (await d.executions(s["id"]))[0]["status"] == "running"

    # Space is freed: the next tick records the jobs the run started, and follows them to their end.
    await d.db.execute("DROP TRIGGER disk_full")
    d.clock.advance(seconds=5)
    await d.scheduler.tick()
    assert len(d.launcher.started) == 2
    run = (await d.executions(s["id"]))[0]
    assert (run["status"], run["jobs_created"], run["jobs_completed"], run["jobs_failed"]) == ("failed", 2, 1, 1)
    detail = await d.schedules.execution(s["id"], run["id"])
    assert {v["vm_name"]: (v["status"], v["job_id"]) for v in detail["vms"]} == \
        {"a": ("completed", jobs["a"]), "b": ("failed", jobs["b"])}
    assert sorted((j["job_id"], j["status"]) for j in detail["jobs"]) == \
        sorted([(jobs["a"], "completed"), (jobs["b"], "failed")])
    assert not await running_attempts_not_followed(d)
