"""omad on a full disk and on a database locked past its busy timeout: every write answers a clear JSON error
(507 storage_full, 503 database_busy) instead of a 500, reads go on, nothing is left half-written, and once the
space is freed or the lock released the same writes succeed without a restart. Start-up on a full disk fails
with one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oma_common.devrun import DaemonFailed, DaemonProcess
from omad.jobs.engine import JobEngine
from omad.store.db import Database

from ..rig import Api, Stack, make_stack
from .backup.conftest import build_inventory, open_rig

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

NIGHTLY = {"cron_expression": "0 30 2 * * *", "action": "replication", "replication_type": "incremental"}
BUSY_TIMEOUT = 0.3  # seconds omad waits for another process's write lock before it answers 503
MIN_FREE = 4 * 1024 * 1024  # free bytes below which health is degraded (of a 16 MiB file system)


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of `size` (no blocks reserved for root, unlike ext4: the test runs as root, omad as `oma`),
    unmounted and removed on every path."""
    d = Path(tempfile.mkdtemp(prefix="oma-full-", dir="/tmp"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "oma-test-full", str(d)], check=True)
        try:
            yield d
        finally:
            subprocess.run(["umount", "--lazy", str(d)], check=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def small_fs() -> Iterator[Path]:
    with tmpfs("16m") as d:
        yield d


@contextlib.contextmanager
def journal_elsewhere(state: Path) -> Iterator[Path]:
    """The daemons' logs (the rig's <state>/logs) off the small file system, as the journal is."""
    logs = Path(tempfile.mkdtemp(prefix="oma-full-log-", dir="/tmp"))
    try:
        (state / "logs").symlink_to(logs)
        yield logs
    finally:
        shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture
def full_stack(small_fs: Path) -> Iterator[Stack]:
    """omad alone with its state directory (database, key) on the small file system; its log elsewhere, as the
    journal is."""
    stack = make_stack(small_fs)
    stack.add_config("omad", "60-busy.toml", f"database_busy_timeout_seconds = {BUSY_TIMEOUT}\n"
                                            f"state_min_free_bytes = {MIN_FREE}\n")
    with journal_elsewhere(small_fs):
        try:
            stack.start("omad")
            yield stack
        finally:
            stack.stop()


def journal(stack: Stack) -> str:
    return (stack.state / "logs" / "omad.log").read_text()


def fill(directory: Path, keep: int = 0) -> Path:
    """Fill the file system holding `directory` with one file, then give back `keep` bytes."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        while chunk:
            try:
                f.write(chunk)
            except OSError:
                chunk = chunk[:len(chunk) // 2]  # the last few blocks too
    assert os.statvfs(directory).f_bavail == 0
    if keep:
        os.truncate(filler, filler.stat().st_size - keep)
    return filler


def assert_clear_error(answer: tuple[int, Any], status: int, code: str, what: str = "") -> None:
    got, body = answer
    assert got == status, (what, answer)
    assert isinstance(body, dict) and body["code"] == code, (what, answer)
    assert set(body) >= {"error", "details", "code", "timestamp"}, (what, body)
    assert "Traceback" not in str(body) and "sqlite" not in str(body).lower(), (what, body)


async def writes(api: Api, password: str, group_id: str, schedule_id: str, n: int) -> dict[str, tuple[int, Any]]:
    """One of each representative write: create and change a machine group and a schedule, log in (a session
    row), run a schedule by hand (an execution row)."""
    out = {
        "create group": await api.post("/machine-groups", {"name": f"group {n}"}),
        "update group": await api.put(f"/machine-groups/{group_id}", {"description": f"changed {n}"}),
        "create schedule": await api.post("/schedules", {**NIGHTLY, "name": f"schedule {n}"}),
        "update schedule": await api.put(f"/schedules/{schedule_id}", {"description": f"changed {n}"}),
        "trigger schedule": await api.post(f"/schedules/{schedule_id}/trigger"),
    }
    async with Api(api.base) as other:
        out["login"] = await other.post("/auth/login", {"username": "admin", "password": password})
    return out


async def test_a_full_disk_refuses_writes_clearly_and_recovers_when_space_is_freed(full_stack: Stack) -> None:
    state = full_stack.state
    async with Api(full_stack.url) as api:
        await api.login("admin", full_stack.admin_password)
        status, group = await api.post("/machine-groups", {"name": "kept"})
        assert status == 201, group
        status, schedule = await api.post("/schedules", {**NIGHTLY, "name": "kept"})
        assert status == 201, schedule
        before = full_stack.sql("SELECT COUNT(*) FROM schedule_executions")

        status, doc = await api.get("/openapi.json")  # declared on every route, with its cause
        assert {"503", "507"} <= set(doc["paths"]["/api/v1/machine-groups"]["post"]["responses"])
        assert {"503", "507"} <= set(doc["paths"]["/api/v1/machine-groups"]["get"]["responses"])

        filler = fill(state)
        for what, answer in (await writes(api, full_stack.admin_password, group["id"], schedule["id"], 1)).items():
            assert_clear_error(answer, 507, "storage_full", what)
            assert "storage" in answer[1]["error"] and "full" in answer[1]["error"], (what, answer)

        # Reads go on, and show nothing of the refused writes.
        status, groups = await api.get("/machine-groups")
        assert status == 200 and [g["name"] for g in groups["groups"]] == ["kept"], groups
        assert groups["groups"][0]["description"] == ""
        status, schedules = await api.get("/schedules")
        assert status == 200 and [s["name"] for s in schedules["schedules"]] == ["kept"], schedules
        assert (await api.get("/auth/me"))[0] == 200
        assert (await api.get("/health"))[0] == 200
        assert full_stack.daemons["omad"].running()
        assert full_stack.sql("SELECT COUNT(*) FROM schedule_executions") == before
        assert full_stack.sql("SELECT COUNT(*) FROM schedule_executions WHERE status IN ('scheduled', 'running')"
                              ) == [(0,)]

        # Space back: the same writes succeed, with no restart.
        filler.unlink()
        done = await writes(api, full_stack.admin_password, group["id"], schedule["id"], 2)
        assert {what: status for what, (status, _) in done.items()} == {
            "create group": 201, "update group": 200, "create schedule": 201, "update schedule": 200,
            "trigger schedule": 202, "login": 200}, done
        status, groups = await api.get("/machine-groups")
        assert sorted(g["name"] for g in groups["groups"]) == ["group 2", "kept"], groups
        assert full_stack.daemons["omad"].running()
    assert full_stack.stop("omad") == {"omad": 0}
    assert full_stack.sql("PRAGMA integrity_check") == [("ok",)]
    # The journal says why each write was refused, and its audit lines name only what was stored.
    log = journal(full_stack)
    assert "Traceback" not in log and log.count("storage is full") >= 6, log
    assert [log.count(f" {action} ") for action in ("machine_group.create", "machine_group.update",
                                                     "schedule.create", "schedule.update", "schedule.trigger",
                                                     "auth.login")] == [2, 1, 2, 1, 1, 2], log
    # The scheduler's line for each execution it opened names only those stored (the refused trigger's was logged
    # before its rollback, with the id the next one then took).
    opened = re.findall(r"schedule 'kept': execution (\d+) (\w+)", log)
    stored = full_stack.sql("SELECT id, status FROM schedule_executions ORDER BY id")
    assert sorted((int(i), status) for i, status in opened) == [(i, status) for i, status in stored], log


async def test_health_reports_the_state_storage_degraded_while_it_is_nearly_full_or_refused_a_write(
        full_stack: Stack) -> None:
    """GET /health says how much space omad's state has left; below the threshold, and after a write was refused
    for lack of space, it is degraded with a message saying so (the database reads, but does not write); space
    back, it is healthy again without any write. The public view gives only the statuses, as for the agents."""
    state = full_stack.state
    async with Api(full_stack.url) as api, Api(full_stack.url) as anon:
        await api.login("admin", full_stack.admin_password)

        async def storage() -> tuple[str, dict[str, Any], dict[str, Any]]:
            """The overall status were the agents well (omad runs alone here), the storage, the database."""
            status, body = await api.get("/health")
            assert status == 200 and body["database"] == "connected", body
            ours = {name: c for name, c in body["components"].items() if name in ("storage", "database")}
            overall = "healthy" if all(c["status"] == "ok" for c in ours.values()) else "degraded"
            assert overall == "healthy" or body["status"] == "degraded", body
            return overall, body["components"]["storage"], body["components"]["database"]

        overall, disk, database = await storage()
        assert (overall, disk["status"], database["status"]) == ("healthy", "ok", "ok"), (disk, database)
        assert disk["path"] == str(state) and disk["min_free_bytes"] == MIN_FREE
        assert abs(disk["free_bytes"] - os.statvfs(state).f_bavail * os.statvfs(state).f_frsize) < 1024 * 1024
        assert 15 * 1024 * 1024 <= disk["total_bytes"] <= 16 * 1024 * 1024, disk

        filler = fill(state, keep=MIN_FREE // 2)  # nearly full: writes still work
        overall, disk, database = await storage()
        assert (overall, disk["status"], database["status"]) == ("degraded", "degraded", "ok"), (disk, database)
        assert disk["free_bytes"] < MIN_FREE and "nearly full" in disk["message"] and str(state) in disk["message"]
        assert (await api.post("/machine-groups", {"name": "fits"}))[0] == 201

        (state / "more").mkdir()
        more = fill(state / "more")  # full: a write is refused
        assert_clear_error(await api.post("/machine-groups", {"name": "refused"}), 507, "storage_full")
        overall, disk, database = await storage()
        assert (overall, disk["status"], database["status"]) == ("degraded", "degraded", "degraded"), disk
        assert "write was refused" in disk["message"] and "write_refused_at" in disk, disk
        status, public = await anon.get("/health")
        assert status == 200 and public["status"] == "degraded"
        assert public["components"]["storage"] == {"status": "degraded"}, public

        filler.unlink()  # space back: healthy, before anything writes
        more.unlink()
        overall, disk, database = await storage()
        assert (overall, disk["status"], database["status"]) == ("healthy", "ok", "ok"), (disk, database)
        assert "message" not in disk and "write_refused_at" not in disk, disk
        assert (await api.post("/machine-groups", {"name": "after"}))[0] == 201


async def test_a_few_kib_left_still_refuses_or_succeeds_never_a_500(full_stack: Stack) -> None:
    """With a little space left the first writes may fit (WAL frames); whatever fits is whole, the rest is 507."""
    async with Api(full_stack.url) as api:
        await api.login("admin", full_stack.admin_password)
        _, group = await api.post("/machine-groups", {"name": "kept"})
        _, schedule = await api.post("/schedules", {**NIGHTLY, "name": "kept"})
        filler = fill(full_stack.state, keep=12 * 1024)
        rounds = [await writes(api, full_stack.admin_password, group["id"], schedule["id"], n) for n in range(1, 4)]
        answers = [answer for done in rounds for answer in done.values()]
        assert {status for status, _ in answers} <= {200, 201, 202, 507}, answers
        assert any(status == 507 for status, _ in answers), answers
        for what, answer in ((w, a) for done in rounds for w, a in done.items()):
            if answer[0] == 507:
                assert_clear_error(answer, 507, "storage_full", what)
        assert full_stack.daemons["omad"].running()
        filler.unlink()
        status, _ = await api.post("/machine-groups", {"name": "after"})
        assert status == 201
        created = [f"group {n}" for n, done in enumerate(rounds, 1) if done["create group"][0] == 201]
        status, groups = await api.get("/machine-groups")
        assert sorted(g["name"] for g in groups["groups"]) == sorted(["kept", "after", *created]), groups
    assert full_stack.stop("omad") == {"omad": 0}
    assert full_stack.sql("PRAGMA integrity_check") == [("ok",)]


@contextlib.contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Another process's write transaction held on omad's database (as `sqlite3` or a backup tool might)."""
    conn = sqlite3.connect(database, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_a_lock_held_past_the_busy_timeout_answers_503_and_passes(full_stack: Stack) -> None:
    async with Api(full_stack.url) as api:
        await api.login("admin", full_stack.admin_password)
        status, group = await api.post("/machine-groups", {"name": "kept"})
        assert status == 201
        with write_locked(full_stack.database):
            for answer in (await api.post("/machine-groups", {"name": "locked out"}),
                           await api.put(f"/machine-groups/{group['id']}", {"description": "locked out"})):
                assert_clear_error(answer, 503, "database_busy")
            async with api.session.post(f"{api.base}/api/v1/machine-groups", json={"name": "locked out"},
                                        headers={"Authorization": f"Bearer {api.token}"}) as r:
                assert r.status == 503 and r.headers.get("Retry-After", "").isdigit(), r.headers
            status, groups = await api.get("/machine-groups")
            assert status == 200 and [g["name"] for g in groups["groups"]] == ["kept"]
        status, _ = await api.post("/machine-groups", {"name": "after"})
        assert status == 201
        status, _ = await api.put(f"/machine-groups/{group['id']}", {"description": "after"})
        assert status == 200
        assert full_stack.daemons["omad"].running()
    log = journal(full_stack)
    assert "Traceback" not in log and log.count("database is busy") >= 2, log


@pytest.mark.parametrize("installed", [False, True], ids=["first start", "restart"])
def test_start_up_on_a_full_disk_fails_with_one_clear_line(small_fs: Path, installed: bool) -> None:
    """A first start (every migration to apply) or a restart (SQLite must create its -shm and -wal files) on a
    full disk: omad exits 1 and says the storage is full, in its journal (here a log file elsewhere, as the
    journal is), without a traceback; systemd starts it again (Restart=on-failure) and, space back, it runs."""
    stack = make_stack(small_fs)
    with journal_elsewhere(small_fs) as logs, contextlib.ExitStack() as stopped:
        stopped.callback(stack.stop)
        if installed:
            stack.start("omad")
            assert stack.stop("omad") == {"omad": 0}
        filler = fill(small_fs)
        omad = DaemonProcess("omad", stack.config_dirs["omad"], log_path=logs / "full.log")
        with pytest.raises(DaemonFailed):
            omad.start(timeout=20)
        assert omad.proc is not None and omad.proc.wait(10) == 1
        log = (logs / "full.log").read_text()
        assert "Traceback" not in log, log
        assert "error: the appliance's storage is full" in log and str(small_fs) in log, log

        filler.unlink()
        stack.start("omad")
        assert stack.sql("PRAGMA integrity_check") == [("ok",)]


async def test_a_job_whose_end_cannot_be_written_is_settled_once_space_is_back(small_fs: Path) -> None:
    """A job cut short by a write the full disk refused is left as a crash would leave it; once space is back its
    type's recovery settles it (or, without one, it is failed with the reason), with no restart."""
    db = Database(small_fs / "oma.db")
    await db.open()
    await db.migrate()
    engine = JobEngine(db, settle_delays=(0.05,))
    recovered: list[str] = []

    async def recover(job: dict[str, Any]) -> None:
        recovered.append(job["id"])
        await engine.finish(job["id"], "failed", "copy undone after the disk filled")

    engine.on_recover("backup_copy", recover)
    try:
        copy = await engine.create("backup_copy", display_name="copy")
        verify = await engine.create("backup_verify", display_name="verify")
        filler = fill(small_fs)

        async def work(job_id: str) -> None:
            await engine.progress(job_id, 50)  # refused: the disk is full

        await asyncio.wait([engine.spawn(copy, work(copy)), engine.spawn(verify, work(verify))])
        assert [(await engine.get(j))["status"] for j in (copy, verify)] == ["running", "running"]
        assert recovered == []

        filler.unlink()
        await asyncio.wait_for(engine.settled(), 10)
        assert recovered == [copy]
        ended = [await engine.get(j) for j in (copy, verify)]
        assert [(j["status"], j["error_message"]) for j in ended] == [
            ("failed", "copy undone after the disk filled"), ("failed", "stopped: the appliance's storage is full")]
    finally:
        await engine.drain(1)
        await db.close()


async def test_a_backup_started_on_a_full_disk_is_refused_clearly_and_runs_once_space_is_back(tmp_path: Path) -> None:
    """The whole stack (omad, the agents' state, a local repository) on one full file system, as /var on an
    appliance: a backup's start answers a clear error and leaves no job, row, export or port; space back, the
    same backup completes."""
    inventory, images, sources = build_inventory(tmp_path)
    with tmpfs("128m") as state, journal_elsewhere(state) as logs:
        stack = make_stack(state)
        async with open_rig(stack, tmp_path, inventory, sources, images) as rig:
            await rig.backup("web 0")
            filler = fill(state)
            status, body = await rig.start("web 1")
            assert status in (503, 507) and isinstance(body, dict), (status, body)
            assert "No space left on device" in body["details"] or body["code"] == "storage_full", body
            assert stack.sql("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')") == [(0,)]
            assert stack.sql("SELECT COUNT(*) FROM backup_jobs WHERE status IN ('pending', 'running')") == [(0,)]
            exports, ports = await rig.nbd_state()
            assert exports == [] and ports["allocated"] == 0, (exports, ports)
            assert (await rig.api.get("/backups"))[0] == 200

            filler.unlink()
            await rig.backup("web 1")
        assert stack.sql("PRAGMA integrity_check") == [("ok",)]
        for log in logs.glob("*.log"):
            assert "Traceback" not in log.read_text(), log.read_text()


async def test_a_backup_whose_undo_cannot_be_written_is_settled_once_the_database_takes_writes(
        tmp_path: Path) -> None:
    """The database is locked by another process while the VMA is being asked to start a backup (its rows, images
    and exports exist), and the VMA refuses: the undo stops the exports and removes the images but cannot record
    the failure. Once the database takes writes again the backup is failed with the VMA's reason, as job settling
    does for every job, instead of staying pending (the idle watchdog judges only running backups). (A full disk
    refuses the same writes, but the undo frees the images' space just before it records the failure.)"""
    inventory, images, sources = build_inventory(tmp_path)
    with tmpfs("128m") as state, journal_elsewhere(state) as logs:
        stack = make_stack(state)
        stack.add_config("omad", "60-busy.toml", f"database_busy_timeout_seconds = {BUSY_TIMEOUT}\n")
        async with open_rig(stack, tmp_path, inventory, sources, images) as rig:
            asked = rig.state.faults.delay("backup/start", 2, method="POST", times=1)
            rig.state.faults.refuse_job(message="failed to create VM snapshot: injected", vm_name="web 1")
            start = asyncio.ensure_future(rig.start("web 1"))
            while asked.hits == 0:
                assert not start.done(), start.result()
                await asyncio.sleep(0.05)
            with write_locked(stack.database):
                status, body = await start
                assert_clear_error((status, body), 503, "database_busy")
                [(backup_id, still)] = stack.sql("SELECT backup_id, status FROM backup_jobs WHERE vm_name = 'web 1'")
                assert still == "pending"
            ended = await rig.wait(backup_id, ("failed",), timeout=10)
            assert ended["error_message"].startswith("the VMA refused the backup: ") and \
                "failed to create VM snapshot: injected" in ended["error_message"], ended
            await rig.assert_nothing_left(backup_id)
        assert stack.sql("PRAGMA integrity_check") == [("ok",)]
        for log in logs.glob("*.log"):
            assert "Traceback" not in log.read_text(), log.read_text()
