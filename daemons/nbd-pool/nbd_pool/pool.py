"""The NBD port pool: TCP ports leased to jobs, all or none per request, persisted before they are handed out.

A lease is bookkeeping only: what runs on a port is exports.py's business, and what happens when a lease
expires (renewed while its export is in use, reclaimed when idle) is jobs.py's. Every change to the table
happens under one lock and is saved before the caller hears of it, so concurrent requests never share a
port and a restart finds every lease it handed out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from oma_common.errors import Conflict, Exhausted, Invalid, NotFound, Unavailable
from oma_common.statefile import StateFile

from oma_common.contracts.nbd_pool import EXPORT_NAME, JOB_ID

from .adapters.ports import PortProbeError, port_is_free

log = logging.getLogger("nbd_pool.pool")

# EXPORT_NAME: names an NBD client asks for (no '/', no spaces, no leading dot); JOB_ID: job ids as omad makes
# them (job-YYYYMMDD-HHMMSS.mmm-xxxxxx, backup ids), which appear in URLs and logs. Both are wire contract.

_EXPORT_NAME = re.compile(EXPORT_NAME)
_JOB_ID = re.compile(JOB_ID)


def check_export_name(name: str) -> str:
    if not _EXPORT_NAME.fullmatch(name):
        raise Invalid("invalid export name",
                      f"export name {name!r} must match {EXPORT_NAME} (letters, digits, '.', '_', ':', '-'; "
                      f"no '/' or spaces)")
    return name


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise Invalid("invalid job id", f"job id {job_id!r} must match {JOB_ID}")
    return job_id


@dataclasses.dataclass
class Lease:
    port: int
    job_id: str
    export_name: str  # the name the job means to export on it ("" when not told)
    allocated_at: float  # epoch seconds
    expires_at: float

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Lease:
        return cls(int(d["port"]), str(d["job_id"]), str(d.get("export_name", "")), float(d["allocated_at"]),
                   float(d["expires_at"]))


class Pool:
    """Leases of the ports port_min..port_max on `host`; a port some other process holds is skipped."""

    def __init__(self, store: StateFile, *, port_min: int, port_max: int, host: str, lease_seconds: int,
                 max_lease_seconds: int, clock: Callable[[], float] = time.time,
                 port_free: Callable[[str, int], bool] = port_is_free) -> None:
        if port_min > port_max:
            raise Invalid("invalid port range", f"port_min {port_min} is above port_max {port_max}")
        self.store = store
        self.port_min = port_min
        self.port_max = port_max
        self.host = host
        self.lease_seconds = lease_seconds
        self.max_lease_seconds = max_lease_seconds
        self.clock = clock
        self._port_free = port_free
        self._leases: dict[int, Lease] = {}
        self._lock = asyncio.Lock()
        self._cursor = port_min  # hand ports out round-robin: a just-freed port rests before its next job

    # --- reading -----------------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.port_max - self.port_min + 1

    def in_range(self, port: int) -> bool:
        return self.port_min <= port <= self.port_max

    def check_in_range(self, port: int) -> None:
        if not self.in_range(port):
            raise Invalid("port outside the pool",
                          f"port {port} is outside the NBD port range {self.port_min}-{self.port_max}")

    def lease(self, port: int) -> Lease | None:
        return self._leases.get(port)

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda lease: lease.port)

    def leases_of(self, job_id: str) -> list[Lease]:
        return [lease for lease in self.leases() if lease.job_id == job_id]

    def expired(self) -> list[Lease]:
        now = self.clock()
        return [lease for lease in self.leases() if lease.expired(now)]

    def _probe(self, port: int) -> bool:
        try:
            return self._port_free(self.host, port)
        except PortProbeError as exc:
            raise Unavailable("cannot probe the NBD ports", str(exc)) from exc

    def foreign_ports(self) -> list[int]:
        """Unleased ports in the range that something else listens on now (one bind(2) each: cheap)."""
        return [p for p in range(self.port_min, self.port_max + 1) if p not in self._leases and not self._probe(p)]

    def status(self) -> dict[str, Any]:
        foreign = self.foreign_ports()
        return {
            "total_ports": self.total,
            "allocated": len(self._leases),
            "available": self.total - len(self._leases) - len(foreign),
            "port_range": {"min": self.port_min, "max": self.port_max},
            "foreign_ports": foreign,
        }

    # --- changing ----------------------------------------------------------------------------------------

    def load(self) -> None:
        leases = [Lease.from_dict(d) for d in self.store.load()]
        self._leases = {lease.port: lease for lease in leases}
        log.info("%d leases loaded", len(self._leases))

    async def _save(self) -> None:
        await self.store.save(lambda: [lease.to_dict() for lease in self.leases()])

    def _duration(self, lease_seconds: int | None) -> int:
        seconds = self.lease_seconds if lease_seconds is None else lease_seconds
        if not 1 <= seconds <= self.max_lease_seconds:
            raise Invalid("invalid lease", f"lease_seconds must be 1..{self.max_lease_seconds}, not {seconds}")
        return seconds

    async def allocate(self, job_id: str, count: int, export_names: list[str] | None = None,
                       lease_seconds: int | None = None) -> list[Lease]:
        """Lease `count` ports to `job_id`, all or none; Exhausted when fewer are free."""
        check_job_id(job_id)
        if not 1 <= count <= self.total:
            raise Invalid("invalid port count", f"count must be 1..{self.total} (the pool's size), not {count}")
        names = export_names if export_names is not None else [""] * count
        if len(names) != count:
            raise Invalid("invalid export names", f"{len(names)} export names for {count} ports")
        for name in names:
            if name:
                check_export_name(name)
        seconds = self._duration(lease_seconds)
        async with self._lock:
            chosen: list[int] = []
            foreign: list[int] = []
            for i in range(self.total):
                port = self.port_min + (self._cursor - self.port_min + i) % self.total
                if port in self._leases:
                    continue
                if not self._probe(port):
                    foreign.append(port)
                    continue
                chosen.append(port)
                if len(chosen) == count:
                    break
            if len(chosen) < count:  # the whole range was walked: `chosen` is every free port
                raise Exhausted(
                    "NBD port pool exhausted",
                    f"job {job_id} asked for {count} port(s) but only {len(chosen)} of {self.total} are free "
                    f"({len(self._leases)} leased, {len(foreign)} held by other processes"
                    f"{': ' + ', '.join(map(str, foreign[:10])) if foreign else ''}); "
                    f"release finished jobs' ports or wait for leases to expire",
                    requested=count, available=len(chosen), allocated=len(self._leases),
                    foreign_ports=foreign)
            now = self.clock()
            new = [Lease(port, job_id, name, now, now + seconds) for port, name in zip(chosen, names)]
            for lease in new:
                self._leases[lease.port] = lease
            self._cursor = self.port_min + (chosen[-1] + 1 - self.port_min) % self.total
            try:
                await self._save()
            except BaseException:
                for lease in new:
                    del self._leases[lease.port]
                raise
        log.info("job %s: leased ports %s for %ds", job_id, ", ".join(str(lease.port) for lease in new), seconds)
        return new

    async def release(self, *, job_id: str | None = None, ports: Iterable[int] | None = None) -> list[Lease]:
        """Free the job's leases, or the listed ports (of that job, when both are given). Idempotent."""
        if job_id is None and ports is None:
            raise Invalid("nothing to release", "send job_id, ports, or both")
        wanted = sorted(set(ports)) if ports is not None else None
        async with self._lock:
            if wanted is None:
                gone = [lease for lease in self.leases() if lease.job_id == job_id]
            else:
                if job_id is not None:
                    self.check_owner(job_id, wanted)
                gone = [self._leases[p] for p in wanted if p in self._leases]
            if not gone:
                return []
            for lease in gone:
                del self._leases[lease.port]
            try:
                await self._save()
            except BaseException:
                for lease in gone:
                    self._leases[lease.port] = lease
                raise
        for lease in gone:
            log.info("job %s: port %d released", lease.job_id, lease.port)
        return gone

    def check_owner(self, job_id: str, ports: Iterable[int]) -> None:
        """Conflict when one of `ports` is leased to another job (a port leased to nobody is fine)."""
        others = [lease for p in sorted(set(ports)) if (lease := self._leases.get(p)) and lease.job_id != job_id]
        if others:
            raise Conflict("port leased to another job",
                           "; ".join(f"port {lease.port} is leased to job {lease.job_id}, not {job_id}"
                                     for lease in others))

    async def renew(self, job_id: str, lease_seconds: int | None = None) -> float:
        """Push the expiry of every lease of the job to now + lease_seconds; returns the new expiry."""
        seconds = self._duration(lease_seconds)
        async with self._lock:
            mine = [lease for lease in self._leases.values() if lease.job_id == job_id]
            if not mine:
                raise NotFound("job has no ports", f"job {job_id} holds no NBD port leases")
            until = self.clock() + seconds
            await self._set_expiry(mine, until)
        log.info("job %s: leases of ports %s renewed for %ds", job_id, ", ".join(str(x.port) for x in mine), seconds)
        return until

    async def extend(self, port: int, seconds: int | None = None) -> Lease | None:
        """Renew one port's lease (an expired lease whose export is still in use); None if it is gone."""
        async with self._lock:
            lease = self._leases.get(port)
            if lease is None:
                return None
            await self._set_expiry([lease], self.clock() + (seconds or self.lease_seconds))
            return lease

    async def _set_expiry(self, leases: list[Lease], until: float) -> None:
        before = [lease.expires_at for lease in leases]
        for lease in leases:
            lease.expires_at = until
        try:
            await self._save()
        except BaseException:
            for lease, old in zip(leases, before):
                lease.expires_at = old
            raise

    async def name_export(self, port: int, name: str) -> None:
        """Remember which export runs on a leased port (status shows it)."""
        async with self._lock:
            lease = self._leases.get(port)
            if lease is None or lease.export_name == name:
                return
            old, lease.export_name = lease.export_name, name
            try:
                await self._save()
            except BaseException:
                lease.export_name = old
                raise
