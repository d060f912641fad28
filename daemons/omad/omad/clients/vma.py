"""The VMA's HTTP API (reached through its SSH tunnel): bounded calls, retries only where repeating is harmless.

Every failure leaves as a domain error: the tunnel down → Unavailable("VMA unreachable"), no answer in
time → TimedOut, a VMA error → the VMA's own text (it answers plain text with a 5xx), a body that is not
the JSON we expect → Unavailable. Callers never see aiohttp's exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from oma_common import errors

from ..config import VmaConfig

log = logging.getLogger(__name__)

# What a VMA status means for our caller; any other status >= 400 is the VMA failing (Unavailable).
_VMA_STATUS: dict[int, type[errors.OmaError]] = {400: errors.Invalid, 404: errors.NotFound, 409: errors.Conflict}
_TEXT_LIMIT = 500  # characters of a VMA error text we pass on


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "…"


class VmaClient:
    def __init__(self, cfg: VmaConfig) -> None:
        self.base_url = cfg.url.rstrip("/")
        self.api_url = self.base_url + "/api/v1"
        self.timeout = cfg.timeout_seconds
        self.discover_timeout = cfg.discover_timeout_seconds
        self.connect_timeout = cfg.connect_timeout_seconds
        self.retries = cfg.retries
        self.retry_delay = cfg.retry_delay_seconds
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the calls omad makes ------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.call("GET", "/health", idempotent=True)  # type: ignore[no-any-return]

    async def discover(self, *, vcenter: str, username: str, password: str, datacenter: str,
                       filter: str | None = None, thumbprint: str = "") -> dict[str, Any]:
        """The VMA's `POST /discover` body: `{vcenter: {host, datacenter}, vms: [...]}` (a read: retried).
        `thumbprint`: the credential's pin of the vCenter's certificate, sent as `vcenter_thumbprint`."""
        body: dict[str, Any] = {"vcenter": vcenter, "username": username, "password": password,
                                "datacenter": datacenter}
        if filter:
            body["filter"] = filter
        if thumbprint:
            body["vcenter_thumbprint"] = thumbprint
        result = await self.call("POST", "/discover", json=body, idempotent=True, timeout=self.discover_timeout)
        if not isinstance(result, dict) or not isinstance(result.get("vms"), list):
            raise errors.Unavailable("VMA answered an unexpected discovery body",
                                     "the VMA's discovery answer has no 'vms' list")
        return result

    async def start_backup(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /backup/start` (CONTRACTS.md "Backups"): `{job_id, status: "started"|"failed", message,
        started_at}`. Never repeated: a second start of the same job would take a second snapshot."""
        result = await self.call("POST", "/backup/start", json=body, idempotent=False)
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            raise errors.Unavailable("VMA answered an unexpected backup start body",
                                     "the VMA's answer to /backup/start has no 'status'")
        return result

    async def replicate(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /replicate` (CONTRACTS.md "Replication"): `{job_id, status, vm_count, started_at}`. Never
        repeated: a second start would take a second snapshot."""
        result = await self.call("POST", "/replicate", json=body, idempotent=False)
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            raise errors.Unavailable("VMA answered an unexpected replication start body",
                                     "the VMA's answer to /replicate has no 'status'")
        return result

    async def progress(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """`GET /progress/{job_id}` of a replication or backup job (a read: retried): the VMA's progress body;
        NotFound when the VMA does not know the job."""
        result = await self.call("GET", f"/progress/{quote(job_id, safe='')}", idempotent=True, timeout=timeout)
        if not isinstance(result, dict):
            raise errors.Unavailable("VMA answered an unexpected progress body",
                                     f"the VMA's progress of {job_id} is not a JSON object")
        return result

    # -- the one way to call the VMA -----------------------------------------------------------------

    async def power(self, vm_uuid: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /vm/{uuid}/power-off|power-on` {vm_id, vcenter, username, password, force?} → {success,
        previous_state, new_state, ...} (CONTRACTS.md, "VMA power calls"); repeating one is harmless."""
        if action not in ("power-off", "power-on"):
            raise ValueError(action)
        result = await self.call("POST", f"/vm/{quote(vm_uuid, safe='')}/{action}", json=body, idempotent=True)
        if not isinstance(result, dict):
            raise errors.Unavailable("VMA answered an unexpected power body", f"the VMA's {action} answer is not "
                                                                              "a JSON object")
        return result

    async def power_state(self, vm_uuid: str) -> str:
        """`GET /vm/{uuid}/power-state` → poweredOn | poweredOff | suspended."""
        result = await self.call("GET", f"/vm/{quote(vm_uuid, safe='')}/power-state", idempotent=True)
        if not isinstance(result, dict) or not isinstance(result.get("power_state"), str):
            raise errors.Unavailable("VMA answered an unexpected power state", "no power_state in the answer")
        return str(result["power_state"])

    async def call(self, method: str, path: str, *, json: Any = None, idempotent: bool,
                   timeout: float | None = None) -> Any:
        """`path` is under /api/v1. An idempotent call is repeated after a connection failure (not after a
        timeout, which would stretch the caller's wait); any other call is made exactly once."""
        attempts = 1 + (self.retries if idempotent else 0)
        delay = self.retry_delay
        for attempt in range(1, attempts + 1):
            try:
                return await self._once(method, path, json, timeout or self.timeout)
            except _Retryable as e:
                if attempt == attempts:
                    raise e.error from e.__cause__
                log.info("VMA %s %s failed (%s); retry %d of %d in %.1f s", method, path, e.error.details,
                         attempt, attempts - 1, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, body: Any, timeout: float) -> Any:
        url = self.api_url + path
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=min(self.connect_timeout, timeout))
        try:
            async with self._client().request(method, url, json=body, timeout=t) as resp:
                raw = await resp.read()
                status = resp.status
        except asyncio.TimeoutError as e:
            raise errors.TimedOut("VMA timed out", f"the VMA did not answer {method} {path} within {timeout:g} s",
                                  ) from e
        except aiohttp.ClientConnectionError as e:
            # Refused, reset or closed before an answer: the tunnel is down or the VMA is restarting.
            err = errors.Unavailable("VMA unreachable", f"cannot reach the VMA at {self.base_url} "
                                                        f"({method} {path}): {e or type(e).__name__}")
            raise _Retryable(err) from e
        text = raw.decode("utf-8", errors="replace")
        if status >= 400:
            raise self._vma_error(status, method, path, text)
        try:
            return json.loads(text) if text.strip() else None
        except ValueError as e:
            raise errors.Unavailable("VMA answered malformed JSON",
                                     f"{method} {path} returned {status} with a body that is not JSON: "
                                     f"{_short(text)[:120]!r}") from e

    @staticmethod
    def _vma_error(status: int, method: str, path: str, text: str) -> errors.OmaError:
        said = _short(text)
        try:  # some VMA handlers answer {"error": "..."} rather than plain text
            body = json.loads(text)
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                said = _short(body["error"])
        except ValueError:
            pass
        cls = _VMA_STATUS.get(status, errors.Unavailable)
        message = said or f"VMA error {status}"
        return cls(message, f"the VMA answered {status} to {method} {path}: {said or '(no text)'}",
                   vma_status=status)


class _Retryable(Exception):
    def __init__(self, error: errors.OmaError) -> None:
        super().__init__(error.message)
        self.error = error
