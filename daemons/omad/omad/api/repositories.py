"""/repositories: backup repositories (local directory, NFS, CIFS/SMB), their capacity, and a dry-run test."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import CALLS_OUT, Conflict, Invalid, NotFound
from oma_common.schema import any_case, name_spec, spec, text_spec
from oma_common.web import Auth, Call, route

from ..backup.repositories import Repositories

_TYPE = any_case("local", "nfs", "cifs", "smb")  # any letter case, as before
# Any segment but "test", so POST /repositories/test is never read as an id whatever the route order.
_ID = "{repository_id:(?!test$)[^/]+}"


@dataclasses.dataclass
class RepositoryIn:
    """A new repository. `config` by type — local: {disk_path}; nfs: {server, export_path, mount_point?,
    options?}; cifs: {server, share_name, username, password, domain?, mount_point?, options?}."""

    name: str = name_spec(min_length=1, max_length=255)
    type: str = spec(pattern=_TYPE, max_length=5, description="local, nfs or cifs (smb)")
    config: dict[str, Any] = spec(description="the type's settings")
    enabled: bool = True
    is_immutable: bool = spec(False, description="stored with the repository; enforced by retention policies")
    min_retention_days: int = spec(0, min=0, max=36500)
    description: str = text_spec("", max_length=4096)


@dataclasses.dataclass
class RepositoryTestIn:
    type: str = spec(pattern=_TYPE, max_length=5)
    config: dict[str, Any] = spec(description="the type's settings, as for creation")


@dataclasses.dataclass
class RepositoryQuery:
    type: str | None = spec(None, pattern=_TYPE, max_length=5)
    enabled: bool | None = None


class RepositoriesApi:
    def __init__(self, repositories: Repositories) -> None:
        self.repositories = repositories

    @route("POST", "/repositories", errors=(Conflict, *CALLS_OUT),
           body=RepositoryIn, status=201, auth=Auth.ADMIN, tags=("repositories",))
    async def create(self, call: Call) -> dict[str, Any]:
        """Create a repository: the directory must be writable, a share is mounted and checked first."""
        return await self.repositories.create(dataclasses.asdict(call.body), actor=call.actor)

    @route("GET", "/repositories", query=RepositoryQuery, response=list[dict[str, Any]], tags=("repositories",))
    async def list(self, call: Call) -> list[dict[str, Any]]:
        """Every repository with its last storage check; filter by `type` and `enabled`."""
        q: RepositoryQuery = call.query
        return await self.repositories.list(type=q.type, enabled=q.enabled)

    @route("GET", f"/repositories/{_ID}", errors=(NotFound,), tags=("repositories",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One repository."""
        return await self.repositories.get(call.params["repository_id"])

    @route("GET", f"/repositories/{_ID}/storage", errors=(NotFound, Conflict, *CALLS_OUT), tags=("repositories",))
    async def storage(self, call: Call) -> dict[str, Any]:
        """Check the capacity now: total, used and available bytes, and the mount point (409 secret_unreadable
        when a network repository's stored secret no longer opens: set it again)."""
        return await self.repositories.storage(call.params["repository_id"])

    @route("POST", "/repositories/test", errors=(Invalid, *CALLS_OUT),
           body=RepositoryTestIn, auth=Auth.ADMIN, tags=("repositories",))
    async def test(self, call: Call) -> dict[str, Any]:
        """Test a configuration without saving it; `success` false carries the reason. A root outside nbd-pool's
        export roots is refused with 400 as at creation (the roots and the drop-in that changes them named)."""
        b: RepositoryTestIn = call.body
        return await self.repositories.test(b.type, b.config)

    @route("DELETE", f"/repositories/{_ID}", errors=(NotFound, Conflict, *CALLS_OUT),
           auth=Auth.ADMIN, tags=("repositories",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Delete a repository's configuration (409 with the count while it holds backups)."""
        return await self.repositories.delete(call.params["repository_id"], actor=call.actor)
