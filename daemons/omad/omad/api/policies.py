"""/policies and a backup's copies, lock and verification: 3-2-1 copy rules, retention runs, immutability."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import CALLS_OUT, Conflict, NotFound
from oma_common.schema import name_spec, spec, text_spec
from oma_common.web import Auth, Call, route

from ..backup.copies import Copies
from ..backup.immutability import Immutability
from ..backup.policies import Policies, PolicySpec, Rule
from ..backup.retention import Retention
from ..backup.verify import Verifier

_ID = "{backup_id:(?!chain$|changeid$)[^/]+}"
# OMA-API.md lists both as arrays and names the GUI as a caller (CONTRACTS.md knows no client of the object).
_Items = list[dict[str, Any]]  # (the class's own `list` method hides the builtin inside its body)
_ARRAY = "A JSON array, as the specification has it (not an object with a count)."


@dataclasses.dataclass
class RuleIn:
    destination_repository_id: str = name_spec(min_length=1, max_length=128)
    copy_mode: Literal["immediate", "scheduled"] = "immediate"
    priority: int = spec(0, min=0, max=1000)
    enabled: bool = True
    verify_after_copy: bool = True


@dataclasses.dataclass
class PolicyIn:
    """A policy: backups go to the primary repository, are copied by the rules, and kept retention_days."""

    name: str = name_spec(min_length=1, max_length=255)
    primary_repository_id: str = name_spec(min_length=1, max_length=128)
    retention_days: int = spec(30, min=0, max=36500, description="0 keeps backups forever")
    enabled: bool = True
    description: str = text_spec("", max_length=4096)
    copy_rules: list[RuleIn] = spec(factory=list)


@dataclasses.dataclass
class PruneQuery:
    dry_run: bool = spec(False, description="only say what would be removed")


@dataclasses.dataclass
class RunsQuery:
    limit: int = spec(50, min=1, max=1000)


@dataclasses.dataclass
class CopyIn:
    repository_id: str = name_spec(min_length=1, max_length=128)
    verify_after_copy: bool = True


@dataclasses.dataclass
class VerifyQuery:
    wait: bool = spec(False, description="answer with the result instead of the job")


@dataclasses.dataclass
class LockIn:
    until: str = spec(min_length=10, max_length=64, description="RFC 3339; later than the current lock's end")


class PoliciesApi:
    def __init__(self, policies: Policies, retention: Retention, copies: Copies, verifier: Verifier,
                 immutability: Immutability) -> None:
        self.policies = policies
        self.retention = retention
        self.copies = copies
        self.verifier = verifier
        self.immutability = immutability

    @route("POST", "/policies", errors=(NotFound, Conflict), body=PolicyIn, status=201, tags=("policies",))
    async def create(self, call: Call) -> dict[str, Any]:
        """Create a policy with its copy rules (repositories must exist; a copy never targets the primary)."""
        b: PolicyIn = call.body
        rules = [Rule(r.destination_repository_id, r.copy_mode, r.priority, r.enabled, r.verify_after_copy)
                 for r in b.copy_rules]
        return await self.policies.create(PolicySpec(b.name, b.primary_repository_id, b.retention_days, b.enabled,
                                                     b.description, rules), actor=call.actor)

    @route("GET", "/policies", tags=("policies",), response=_Items, description=_ARRAY)
    async def list(self, call: Call) -> _Items:
        """Every policy with its copy rules."""
        return (await self.policies.list())["policies"]  # type: ignore[no-any-return]

    @route("GET", "/policies/{policy_id}", errors=(NotFound,), tags=("policies",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One policy with its copy rules."""
        return await self.policies.get(call.params["policy_id"])

    @route("DELETE", "/policies/{policy_id}", errors=(NotFound, Conflict), auth=Auth.ADMIN, tags=("policies",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Delete a policy and its copy rules (its backups stay)."""
        return await self.policies.delete(call.params["policy_id"], actor=call.actor)

    @route("POST", "/policies/{policy_id}/prune", errors=(NotFound, Conflict, *CALLS_OUT),
           query=PruneQuery, auth=Auth.ADMIN, tags=("policies",))
    async def prune(self, call: Call) -> dict[str, Any]:
        """Apply the policy's retention now (dry_run: what would go); never a locked or needed backup."""
        return await self.retention.prune(call.params["policy_id"], dry_run=call.query.dry_run, actor=call.actor)

    @route("GET", "/policies/{policy_id}/prune-runs", errors=(NotFound,), query=RunsQuery, tags=("policies",))
    async def prune_runs(self, call: Call) -> dict[str, Any]:
        """The policy's retention runs, newest first: what was removed, kept (and why), refused."""
        return await self.retention.runs(call.params["policy_id"], call.query.limit)

    @route("GET", f"/backups/{_ID}/copies", errors=(NotFound,), tags=("backups",), response=_Items,
           description=_ARRAY)
    async def backup_copies(self, call: Call) -> _Items:
        """The backup's copies in other repositories, with their state."""
        return (await self.copies.of_backup(call.params["backup_id"]))["copies"]  # type: ignore[no-any-return]

    @route("POST", f"/backups/{_ID}/copy", errors=(NotFound, Conflict), body=CopyIn, tags=("backups",))
    async def copy(self, call: Call) -> dict[str, Any]:
        """Copy the backup (and what its chain needs) into another repository, as a job."""
        b: CopyIn = call.body
        return await self.copies.request(call.params["backup_id"], b.repository_id, actor=call.actor,
                                         verify_after_copy=b.verify_after_copy)

    @route("GET", "/copies/{copy_id}", errors=(NotFound,), tags=("backups",))
    async def get_copy(self, call: Call) -> dict[str, Any]:
        """One copy: status, attempts, progress, the failure's reason."""
        return await self.copies.get(call.params["copy_id"])

    @route("POST", f"/backups/{_ID}/verify", errors=(NotFound, Conflict, *CALLS_OUT),
           query=VerifyQuery, tags=("backups",))
    async def verify(self, call: Call) -> dict[str, Any]:
        """Verify the backup's images and chain (qemu-img check, checksums, backing links), as a job."""
        return await self.verifier.request(call.params["backup_id"], wait=call.query.wait)

    @route("GET", f"/backups/{_ID}/verification", errors=(NotFound,), tags=("backups",))
    async def verification(self, call: Call) -> dict[str, Any]:
        """The last verification's result and time."""
        return await self.verifier.result(call.params["backup_id"])

    @route("GET", f"/backups/{_ID}/lock", errors=(NotFound,), tags=("backups",))
    async def lock_state(self, call: Call) -> dict[str, Any]:
        """Whether the backup is immutable, until when, and whether its files are locked on disk."""
        return await self.immutability.state(call.params["backup_id"])

    @route("POST", f"/backups/{_ID}/lock", errors=(NotFound, Conflict), body=LockIn, auth=Auth.ADMIN, tags=("backups",))
    async def extend_lock(self, call: Call) -> dict[str, Any]:
        """Extend the backup's lock (and its chain's); shortening is refused (409 with unlock_at)."""
        return await self.immutability.extend(call.params["backup_id"], call.body.until, actor=call.actor)
