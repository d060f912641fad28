"""A replication completes when the VMA is done, not at omad's next poll of the VMA: with the installed poll
interval (5 s), a sync ends well within a second of the VMA's Succeeded, because the VMA's last change id (or its
pushed "completed" telemetry) has omad ask the VMA at once. The rule stays: nothing completes before the VMA
says Succeeded with every disk's change id in; failures and silence are still found by polling."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.sim.cloudstack import CloudStackSim
from tests.sim.vma import FINALIZING, SUCCEEDED, MiB
from tests.sim.vma import faults as F

from ..rig import Stack
from .replication_rig import Rig, open_rig
from .test_replication import make_sources

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

SIZES = [16 * MiB, 8 * MiB]
POLL = 5.0  # omad's installed [replication] poll_interval_seconds
IDLE = 3.0

Opener = Callable[..., AbstractAsyncContextManager[Rig]]


@pytest.fixture
def opener(cloudstack_sim: CloudStackSim, stack_config: Stack, tmp_path: Path) -> Opener:
    """Opens the rig with omad polling the VMA every POLL seconds (simulator options as keywords)."""
    sources = make_sources(tmp_path, SIZES)

    def open_(idle_timeout: float = IDLE, **sim_options: Any) -> AbstractAsyncContextManager[Rig]:
        return open_rig(stack_config, cloudstack_sim, tmp_path, sources, idle_timeout=idle_timeout,
                        poll_interval=POLL, **sim_options)
    return open_


@pytest.fixture
async def rig(opener: Opener) -> AsyncIterator[Rig]:
    async with opener() as r:
        yield r


async def started(rig: Rig) -> str:
    status, body = await rig.start()
    assert status == 201, body
    return str(body["job_id"])


async def change_ids_stored(rig: Rig, job_id: str, count: int = len(SIZES)) -> float:
    """Wait until the VMA stored `count` change ids of the job; when the last answer came (wall clock)."""
    deadline = time.monotonic() + 60
    while True:
        calls = [c for c in rig.state.calls_to(f"/replications/{job_id}/changeid", "POST") if c.status == 200]
        if len(calls) >= count:
            return max(c.at for c in calls)
        assert time.monotonic() < deadline, (calls, rig.log_tail())
        await asyncio.sleep(0.01)


async def test_a_sync_completes_as_soon_as_the_vma_is_done(rig: Rig) -> None:
    for expected in ("initial", "incremental"):
        if expected == "incremental":
            rig.write(0, 2 * MiB, MiB, seed=3)
        job_id = await started(rig)
        # omad follows the job once the VMA took it: its first scheduled poll comes POLL after that, at the soonest.
        asked = rig.state.requests_to("replicate", "POST")[-1].at
        await rig.state.wait_job(job_id, timeout=60)
        succeeded = time.time()
        done = await rig.wait(job_id)
        completed = time.time()
        assert done["status"] == "completed" and done["replication_type"] == expected, done
        assert done["vma_status"] == SUCCEEDED  # what the poll that completed it saw
        assert completed - asked < POLL, (expected, completed - asked, rig.log_tail())
        assert completed - succeeded < POLL / 2, (expected, completed - succeeded)  # not at the next poll
        rig.assert_volumes_hold_sources(done)
        await rig.assert_released()
    assert "completion took" in rig.log_tail(lines=400)


async def test_a_vma_still_finalizing_is_not_taken_for_done(opener: Opener) -> None:
    """The VMA stores the last change id, then removes its snapshot before it says Succeeded: omad, nudged by
    that change id, asks and hears Finalizing; it asks again soon after, and completes once it hears Succeeded."""
    async with opener(finalize_seconds=1.5) as rig:
        job_id = await started(rig)
        last_id = await change_ids_stored(rig, job_id)
        await asyncio.sleep(0.5)
        assert rig.state.job(job_id).status == FINALIZING
        status, body = await rig.api.get(f"/replications/{job_id}")
        assert status == 200 and body["status"] == "replicating", body
        assert all(d["change_id"] for d in body["disks"])
        polled = [r.at for r in rig.state.requests_to(f"progress/{job_id}", "GET") if r.at > last_id]
        assert len(polled) >= 2, polled  # nudged at once, then again 20 ms, 40 ms, ... later
        assert body["vma_status"] == FINALIZING
        await rig.state.wait_job(job_id, timeout=30)
        succeeded = time.time()
        done = await rig.wait(job_id)
        assert done["status"] == "completed" and done["vma_status"] == SUCCEEDED, done
        assert time.time() - succeeded < POLL / 2
        rig.assert_volumes_hold_sources(done)
        await rig.assert_released()


async def test_telemetry_saying_completed_has_omad_ask_the_vma(opener: Opener) -> None:
    """The VMA's pushed "completed" is a nudge, never a completion by itself: the job completes when the VMA's
    progress says Succeeded and every change id is in."""
    async with opener(idle_timeout=60) as rig:
        await telemetry_nudges(rig)


async def telemetry_nudges(rig: Rig) -> None:
    rig.state.faults.add_job(F.JobFault(F.HANG, kind="replication"))
    job_id = await started(rig)
    job = await rig.state.wait_job(job_id, statuses=(FINALIZING,))
    telemetry = {"job_id": job_id, "job_type": "replication", "status": "completed", "current_phase": "completed",
                 "bytes_transferred": 1, "total_bytes": 1, "progress_percent": 100.0}

    async def push() -> None:
        async with aiohttp.ClientSession() as vma:
            async with vma.post(f"{rig.stack.url}/api/v1/telemetry/replication/{job_id}", json=telemetry) as r:
                assert r.status == 200 and (await r.json())["status"] == "recorded"

    await push()  # no change id yet, the VMA still Finalizing
    for disk in job.disks:
        status, body = await rig.api.post(f"/replications/{job_id}/changeid",
                                          {"disk_id": disk.disk_id, "change_id": disk.change_id})
        assert status == 200, body
    # Nudged by the last change id, omad asks: Finalizing. Its pauses grow back to the interval meanwhile.
    await asyncio.sleep(POLL + 0.5)
    assert (await rig.api.get(f"/replications/{job_id}"))[1]["status"] == "replicating"
    # Its next poll is now about POLL away; the VMA says it is done and pushes that.
    job.set(SUCCEEDED, "Replication completed")
    pushed = time.monotonic()
    await push()
    done = await rig.wait(job_id)
    assert done["status"] == "completed", done
    assert time.monotonic() - pushed < POLL / 2  # not at the next poll
    await rig.assert_released()


async def test_omad_killed_mid_sync_completes_promptly_once_back(rig: Rig) -> None:
    """The change ids the VMA retries while omad is down land in the new omad, before or after it adopts the job:
    either way the job completes without waiting for a poll interval."""
    job_id = await started(rig)
    rig.stack.daemons["omad"].stop(sig=signal.SIGKILL)
    await asyncio.sleep(0.5)  # the VMA asks for its change ids meanwhile, and retries
    restarted = time.monotonic()
    await asyncio.to_thread(rig.stack.start, "omad")
    done = await rig.wait(job_id)
    assert done["status"] == "completed", (done, rig.log_tail())
    assert time.monotonic() - restarted < POLL + 5, rig.log_tail(lines=200)  # omad starts, then completes it
    assert "after the last nudge" in rig.log_tail(lines=400)
    rig.assert_volumes_hold_sources(done)
    await rig.assert_released()


async def test_failure_and_silence_still_end_the_job(rig: Rig) -> None:
    rig.state.faults.add_job(F.JobFault(F.FAIL, kind="replication", after_bytes=2 * MiB))
    failed = await rig.wait(await started(rig))
    assert failed["status"] == "failed" and "injected failure" in failed["error_message"]
    await rig.assert_released()
    rig.state.faults.add_job(F.JobFault(F.DISCONNECT, kind="replication", after_bytes=2 * MiB))
    silent = await rig.wait(await started(rig), timeout=60)
    assert silent["status"] == "failed" and "silent" in silent["error_message"]
    await rig.assert_released()
    done = await rig.sync()
    rig.assert_volumes_hold_sources(done)
