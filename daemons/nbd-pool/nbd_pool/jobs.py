"""What a job does with the pool: allocate ports, renew and release them (its exports stop first, all at once),
and what happens to leases that expire.

An expired lease is only a hint that its job may be gone. A backup must never die because of a lease, so an
expired lease whose export has a client connected, or had one within the idle grace period, is renewed or
kept; an expired lease that is idle that long (or has no export at all) is reclaimed: its export stopped,
its port freed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from oma_common.errors import Exhausted, Invalid
from oma_common.timefmt import rfc3339
from oma_common.together import every

from .exports import Exports
from .pool import Lease, Pool, check_job_id

log = logging.getLogger("nbd_pool.jobs")


def lease_view(lease: Lease) -> dict[str, Any]:
    return {"port": lease.port, "job_id": lease.job_id, "export_name": lease.export_name,
            "allocated_at": rfc3339(lease.allocated_at, timespec="seconds"), "expires_at": rfc3339(lease.expires_at, timespec="seconds")}


class Jobs:
    def __init__(self, pool: Pool, exports: Exports, *, idle_grace_seconds: float, clock: Callable[[], float]) -> None:
        self.pool = pool
        self.exports = exports
        self.idle_grace_seconds = idle_grace_seconds
        self.clock = clock

    async def allocate(self, job_id: str, count: int, export_names: list[str] | None = None,
                       lease_seconds: int | None = None) -> dict[str, Any]:
        """Lease `count` ports, all or none; when short, reclaim idle expired leases first and try once more."""
        try:
            leases = await self.pool.allocate(job_id, count, export_names, lease_seconds)
        except Exhausted:
            if not (await self.sweep_expired())["reclaimed"]:
                raise
            leases = await self.pool.allocate(job_id, count, export_names, lease_seconds)
        return {"job_id": job_id,
                "allocated_ports": [{"port": lease.port, "export_name": lease.export_name} for lease in leases],
                "expires_at": rfc3339(min(lease.expires_at for lease in leases), timespec="seconds"),
                "lease_seconds": round(leases[0].expires_at - leases[0].allocated_at)}

    async def release(self, job_id: str | None = None, ports: list[int] | None = None) -> dict[str, Any]:
        """Free the job's ports or the listed ones; an export still running on one is stopped first."""
        if job_id is None and ports is None:
            raise Invalid("nothing to release", "send job_id, ports, or both")
        if job_id is not None:
            check_job_id(job_id)
        if ports is not None:
            for port in ports:
                self.pool.check_in_range(port)
            targets = sorted(set(ports))
        else:
            mine = {lease.port for lease in self.pool.leases_of(job_id or "")}
            targets = sorted(mine | {live.port for live in self.exports.of_job(job_id or "")})
        async with self.exports.locked(targets):
            if job_id is not None:
                self.pool.check_owner(job_id, targets)  # before anything is stopped
            stopped = await self._stop_all(targets)
            released = await self.pool.release(job_id=job_id, ports=targets)
        return {"success": True, "released_count": len(released), "released_ports": [x.port for x in released],
                "stopped_exports": len(stopped), "stopped_pids": stopped}

    async def _stop_all(self, ports: list[int]) -> list[int]:
        """Stop the exports on `ports` at once (the caller holds their locks); returns the pids stopped.

        Each qemu-nbd flushes what was written before it exits, which takes a while: a job's disks flush in
        parallel rather than one after another. When one cannot be stopped the others are still stopped (and
        their records dropped), no port is freed, and the first failure is raised once all have ended: the
        caller retries.
        """
        async def stop(port: int) -> int | None:
            try:
                return await self.exports.stop_locked(port)
            except Exception as exc:
                log.warning("export on port %d did not stop: %s", port, exc)
                raise

        return [pid for pid in await every(*(stop(port) for port in ports)) if pid is not None]

    async def release_job(self, job_id: str) -> dict[str, Any]:
        """Stop every export of the job and free all its ports (the clean-up after success or failure)."""
        return await self.release(job_id=job_id)

    async def renew(self, job_id: str, lease_seconds: int | None = None) -> dict[str, Any]:
        check_job_id(job_id)
        until = await self.pool.renew(job_id, lease_seconds)
        return {"job_id": job_id, "expires_at": rfc3339(until, timespec="seconds"),
                "ports": [lease.port for lease in self.pool.leases_of(job_id)]}

    async def sweep_expired(self) -> dict[str, list[int]]:
        """Renew expired leases whose export is in use, reclaim the idle ones. Returns the ports of each."""
        out: dict[str, list[int]] = {"renewed": [], "kept": [], "reclaimed": []}
        expired = self.pool.expired()
        if not expired:
            return out
        await self.exports.refresh()
        for lease in expired:
            live = self.exports.on_port(lease.port)
            idle = self.exports.idle_seconds(lease.port)
            if live is not None and live.clients:
                if await self.pool.extend(lease.port) is not None:
                    log.info("job %s: lease of port %d expired while export %s has %d client(s); renewed",
                             lease.job_id, lease.port, live.name, len(live.clients))
                    out["renewed"].append(lease.port)
                continue
            if idle is not None and idle < self.idle_grace_seconds:
                out["kept"].append(lease.port)  # a client was there a moment ago: it may reconnect
                continue
            async with self.exports.locked([lease.port]):
                current = self.pool.lease(lease.port)
                if current is not lease or not lease.expired(self.clock()):
                    continue  # released or renewed while we waited for the lock
                pid = await self.exports.stop_locked(lease.port)
                await self.pool.release(ports=[lease.port])
            log.warning("job %s: lease of port %d expired %s ago and is idle; reclaimed%s", lease.job_id, lease.port,
                        f"{self.clock() - lease.expires_at:.0f}s", f" (stopped export pid {pid})" if pid else "")
            out["reclaimed"].append(lease.port)
        return out
