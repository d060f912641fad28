"""nbd-pool's socket API as typed calls: ports, qemu-nbd exports, read-only attachments.

The agent's routes (nbd-pool/nbd_pool/api.py is the other side; job ids match
[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}, export names omad's api/nbd.py EXPORT_NAME; times are RFC 3339):
  POST /ports/allocate {job_id, count, export_names?, lease_seconds?}
       → {job_id, allocated_ports: [{port, export_name}], expires_at, lease_seconds}; 409 exhausted (+available)
  POST /ports/release  {job_id?, ports?}   exports on those ports are stopped first
       → {success, released_count, released_ports, stopped_exports, stopped_pids}; 409 if a port is another job's
  POST /ports/renew    {job_id, lease_seconds?}                       → {job_id, expires_at, ports}; 404 no leases
  GET  /ports/status   → {total_ports, allocated, available, port_range: {min, max}, foreign_ports,
                          allocations: [{port, job_id, export_name, allocated_at, expires_at}]}
  POST /exports        {export_name, port, path, format?, read_only, shared_connections, job_id?}
       → the export as listed below, plus size; answers once the export completes an NBD handshake
  POST /exports/stop   {pid? | export_name?}                          → {success, stopped_pid}; the port stays leased
  GET  /exports        → {processes: [{pid, port, export_name, path, qcow2_path, resolved_path, format, read_only,
                          job_id, bind_address, started_at, uptime_seconds, connection_count, clients,
                          shared_limit, status}]}
  POST /jobs/{job_id}/release                                         → as /ports/release
  POST /attachments    {image, owner, format?}                        → 201 {attachment_id, owner, image,
                          resolved_image, format, backend, device, partitions: [{number, device, start, size,
                          type, name}], attached_at, status, pid}; 409 exhausted (+available_slots)
  DELETE /attachments/{attachment_id}                                 → {success}; 409 while a partition is mounted
  GET  /attachments    → {attachments: [...], max_attachments, available_slots, backend}
  GET  /roots          → {export_roots, resolved_roots, drop_in: "<dir>/*.toml", key: "export_roots"}
  GET  /health         → {..., total_ports, allocated, available, foreign_ports, exports, attachments,
                          max_attachments, backend}
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from oma_common.rpc import AgentClient


class NbdPool:
    def __init__(self, client: AgentClient) -> None:
        self.client = client

    async def allocate(self, job_id: str, count: int, export_names: list[str] | None = None,
                       lease_seconds: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"job_id": job_id, "count": count}
        if export_names is not None:
            body["export_names"] = export_names
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        return await self.client.call("POST", "/ports/allocate", json=body)  # type: ignore[no-any-return]

    async def release(self, job_id: str | None = None, ports: list[int] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if job_id is not None:
            body["job_id"] = job_id
        if ports is not None:
            body["ports"] = ports
        return await self.client.call("POST", "/ports/release", json=body)  # type: ignore[no-any-return]

    async def renew(self, job_id: str, lease_seconds: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"job_id": job_id}
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        return await self.client.call("POST", "/ports/renew", json=body)  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self.client.call("GET", "/ports/status")  # type: ignore[no-any-return]

    async def start_export(self, *, export_name: str, port: int, path: str, read_only: bool = False,
                           shared_connections: int = 10, fmt: str | None = None,
                           job_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"export_name": export_name, "port": port, "path": path, "read_only": read_only,
                                "shared_connections": shared_connections}
        if fmt is not None:
            body["format"] = fmt
        if job_id is not None:
            body["job_id"] = job_id
        return await self.client.call("POST", "/exports", json=body, timeout=60)  # type: ignore[no-any-return]

    async def stop_export(self, *, pid: int | None = None, export_name: str | None = None) -> dict[str, Any]:
        body = {"pid": pid} if pid is not None else {"export_name": export_name}
        return await self.client.call("POST", "/exports/stop", json=body, timeout=60)  # type: ignore[no-any-return]

    async def exports(self) -> list[dict[str, Any]]:
        return (await self.client.call("GET", "/exports"))["processes"]  # type: ignore[no-any-return]

    async def release_job(self, job_id: str) -> dict[str, Any]:
        """Stop every export of the job and free its ports (cleanup after success or failure)."""
        return await self.client.call("POST", f"/jobs/{quote(job_id, safe='')}/release",  # type: ignore[no-any-return]
                                      timeout=60)

    async def roots(self) -> dict[str, Any]:
        """Where images may be exported from, and the drop-in an operator changes that in."""
        return await self.client.call("GET", "/roots")  # type: ignore[no-any-return]

    async def attach(self, image: str, owner: str) -> dict[str, Any]:
        return await self.client.call("POST", "/attachments", json={"image": image, "owner": owner},  # type: ignore[no-any-return]
                                      timeout=60)

    async def detach(self, attachment_id: str) -> None:
        await self.client.call("DELETE", f"/attachments/{quote(attachment_id, safe='')}", timeout=60)
