"""The calls the VMA's backup client and replication engine make back to the OMA (no token: they
arrive through the tunnel from loopback), each recorded in the state's outbound log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Optional
from urllib.parse import quote

import aiohttp

from .state import OutboundCall, SimState

log = logging.getLogger(__name__)


class OmaCallError(Exception):
    """The OMA did not answer 2xx (or did not answer)."""


class OmaClient:
    def __init__(self, state: SimState, session: aiohttp.ClientSession) -> None:
        self._state = state
        self._session = session

    async def call(self, method: str, base_url: str, path: str, body: Any = None,
                   params: Optional[dict[str, str]] = None) -> tuple[Optional[int], Any]:
        """One call; returns (status, parsed body). Never raises for HTTP or connection errors."""
        url = base_url.rstrip("/") + path
        if params:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        status: Optional[int] = None
        response: Any = None
        try:
            timeout = aiohttp.ClientTimeout(total=self._state.outbound_timeout)
            async with self._session.request(method, url, json=body, timeout=timeout) as resp:
                status = resp.status
                text = await resp.text()
                try:
                    response = json.loads(text)
                except ValueError:
                    response = text
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            response = f"{type(e).__name__}: {e}"
        self._state.outbound.append(OutboundCall(method, url, body, status, response, time.time()))
        log.debug("OMA %s %s -> %s", method, url, status)
        return status, response

    async def _patient(self, method: str, base_url: str, path: str, body: Any = None,
                       params: Optional[dict[str, str]] = None) -> tuple[Optional[int], Any]:
        """Like the real replication engine behind its SSH tunnel: an OMA that does not answer (restarting)
        is asked again for `callback_retry_seconds`; an answer, even an error, is final."""
        deadline = time.monotonic() + self._state.callback_retry_seconds
        while True:
            status, response = await self.call(method, base_url, path, body, params)
            if status is not None or time.monotonic() >= deadline:
                return status, response
            await asyncio.sleep(0.25)

    async def telemetry(self, base_url: str, job_type: str, job_id: str, body: dict[str, Any]) -> None:
        status, response = await self.call("POST", base_url, f"/api/v1/telemetry/{job_type}/{quote(job_id, safe='')}", body)
        if status is None or status >= 300:
            # The real client logs and carries on: telemetry is advisory.
            log.warning("telemetry for %s refused: %s %s", job_id, status, response)

    async def complete_backup(self, base_url: str, job_id: str, disk_index: int, change_id: str,
                              bytes_transferred: int) -> None:
        body = {"change_id": change_id, "disk_id": disk_index, "bytes_transferred": bytes_transferred}
        status, response = await self.call("POST", base_url, f"/api/v1/backups/{quote(job_id, safe='')}/complete", body)
        if status is None or status >= 300:
            raise OmaCallError(f"completing disk {disk_index} of backup {job_id} failed: {status} {response}")

    async def backup_change_id(self, base_url: str, vm_name: str, disk_index: int) -> Optional[str]:
        """The change id of the last completed backup of this disk; None on any non-200 (→ full)."""
        status, response = await self.call("GET", base_url, "/api/v1/backups/changeid",
                                           params={"vm_name": vm_name, "disk_id": str(disk_index)})
        if status == 200 and isinstance(response, dict):
            return response.get("change_id") or None
        return None

    async def replication_change_id(self, base_url: str, vm_path: str, disk_id: str) -> Optional[str]:
        """The stored change id for a replicated disk; None when empty (→ full copy)."""
        status, response = await self._patient("GET", base_url, "/api/v1/replications/changeid",
                                               params={"vm_path": vm_path, "disk_id": disk_id})
        if status == 200 and isinstance(response, dict):
            return response.get("change_id") or None
        if status is None or status >= 500:
            raise OmaCallError(f"reading the change id of {vm_path} {disk_id} failed: {status} {response}")
        return None

    async def store_replication_change_id(self, base_url: str, job_id: str, disk_id: str, change_id: str,
                                          previous_change_id: Optional[str]) -> None:
        body: dict[str, Any] = {"change_id": change_id, "disk_id": disk_id}
        if previous_change_id:
            body["previous_change_id"] = previous_change_id
        path = f"/api/v1/replications/{quote(job_id, safe='')}/changeid"
        status, response = await self._patient("POST", base_url, path, body)
        if status is None or status >= 300:
            raise OmaCallError(f"storing the change id of {job_id} {disk_id} failed: {status} {response}")
