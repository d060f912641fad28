"""VMA enrollment: the administrator's /admin/vma/* and the VMA's public /vma/enroll* (CONTRACTS.md,
"VMA enrollment")."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import Conflict, NotFound, RateLimited, Unauthorized
from oma_common.schema import spec
from oma_common.web import Auth, Call, route

from ..vma.enrollment import EnrollRequest, Enrollments


@dataclasses.dataclass
class PairingCodeIn:
    generated_by: str | None = spec(None, max_length=255)
    valid_for: int = spec(600, min=60, description="seconds the code may be used for")


@dataclasses.dataclass
class EnrollIn:
    pairing_code: str = spec(min_length=1, max_length=32, description="XXXX-XXXX-XXXX")
    vma_public_key: str = spec(min_length=1, max_length=8192, description="ssh-ed25519 AAAA... name")
    vma_name: str = spec(min_length=1, max_length=255)
    vma_version: str = spec("", max_length=64)
    vma_fingerprint: str = spec("", max_length=255)


@dataclasses.dataclass
class EnrollOut:
    enrollment_id: str
    challenge: str
    status: str
    message: str


@dataclasses.dataclass
class VerifyIn:
    enrollment_id: str = spec(min_length=1, max_length=64)
    signature: str = spec(min_length=1, max_length=1024, description="base64 of the Ed25519 signature of the "
                                                                     "challenge")


@dataclasses.dataclass
class ResultQuery:
    enrollment_id: str = spec(min_length=1, max_length=64)


@dataclasses.dataclass
class ApproveIn:
    approved_by: str | None = spec(None, max_length=255)
    notes: str = spec("", max_length=4096)


@dataclasses.dataclass
class RejectIn:
    rejected_by: str | None = spec(None, max_length=255)
    reason: str = spec("", max_length=4096)


@dataclasses.dataclass
class RevokeQuery:
    revoked_by: str | None = spec(None, max_length=255)


@dataclasses.dataclass
class AuditQuery:
    event_type: str | None = spec(None, max_length=64, description="e.g. enroll, verify, approve, revoke")
    limit: int = spec(100, min=1, max=1000)


class VmaEnrollmentApi:
    def __init__(self, enrollments: Enrollments) -> None:
        self.enrollments = enrollments

    # -- the VMA -------------------------------------------------------------------------------------------

    @route("POST", "/vma/enroll", errors=(Unauthorized, Conflict, RateLimited),
           body=EnrollIn, response=EnrollOut, auth=Auth.PUBLIC, tags=("vma",))
    async def enroll(self, call: Call) -> dict[str, Any]:
        """Enroll with a pairing code and an ssh-ed25519 key; answers the challenge to sign (401: bad code)."""
        b: EnrollIn = call.body
        return await self.enrollments.enroll(
            EnrollRequest(b.pairing_code, b.vma_public_key, b.vma_name, b.vma_version, b.vma_fingerprint),
            call.request.remote or "unknown")

    @route("POST", "/vma/enroll/verify", errors=(NotFound, Conflict, Unauthorized, RateLimited),
           body=VerifyIn, auth=Auth.PUBLIC, tags=("vma",))
    async def verify(self, call: Call) -> dict[str, Any]:
        """Prove possession of the key: the base64 Ed25519 signature of the challenge (one attempt)."""
        b: VerifyIn = call.body
        return await self.enrollments.verify(b.enrollment_id, b.signature, call.request.remote or "unknown")

    @route("GET", "/vma/enroll/result", errors=(NotFound, RateLimited),
           query=ResultQuery, auth=Auth.PUBLIC, tags=("vma",))
    async def result(self, call: Call) -> dict[str, Any]:
        """The enrollment's status; once approved, the tunnel user, ssh options and host key hash."""
        return await self.enrollments.result(call.query.enrollment_id, call.request.remote or "unknown")

    # -- the administrator ---------------------------------------------------------------------------------

    @route("POST", "/admin/vma/pairing-code", body=PairingCodeIn, auth=Auth.ADMIN, tags=("vma",))
    async def pairing_code(self, call: Call) -> dict[str, Any]:
        """A single-use pairing code (XXXX-XXXX-XXXX), valid for valid_for seconds (default 600)."""
        b: PairingCodeIn = call.body
        return await self.enrollments.create_pairing_code(b.valid_for, generated_by=b.generated_by, actor=call.actor)

    @route("GET", "/admin/vma/pending", auth=Auth.ADMIN, tags=("vma",))
    async def pending(self, call: Call) -> dict[str, Any]:
        """Enrollments waiting for their proof of possession or for approval."""
        return await self.enrollments.pending()

    @route("POST", "/admin/vma/approve/{enrollment_id}", errors=(NotFound, Conflict),
           body=ApproveIn, auth=Auth.ADMIN, tags=("vma",))
    async def approve(self, call: Call) -> dict[str, Any]:
        """Approve a verified enrollment: its key may open the tunnel (409 unless awaiting approval)."""
        b: ApproveIn = call.body
        return await self.enrollments.approve(call.params["enrollment_id"], approved_by=b.approved_by, notes=b.notes,
                                              actor=call.actor)

    @route("POST", "/admin/vma/reject/{enrollment_id}", errors=(NotFound, Conflict),
           body=RejectIn, auth=Auth.ADMIN, tags=("vma",))
    async def reject(self, call: Call) -> dict[str, Any]:
        """Reject an enrollment that is not approved yet."""
        b: RejectIn = call.body
        return await self.enrollments.reject(call.params["enrollment_id"], rejected_by=b.rejected_by, reason=b.reason,
                                             actor=call.actor)

    @route("DELETE", "/admin/vma/revoke/{enrollment_id}", errors=(NotFound, Conflict),
           query=RevokeQuery, auth=Auth.ADMIN, tags=("vma",))
    async def revoke(self, call: Call) -> dict[str, Any]:
        """Revoke an approved VMA: its key stops working at once and its live tunnel is ended."""
        return await self.enrollments.revoke(call.params["enrollment_id"], revoked_by=call.query.revoked_by,
                                             actor=call.actor)

    @route("GET", "/admin/vma/active", auth=Auth.ADMIN, tags=("vma",))
    async def active(self, call: Call) -> dict[str, Any]:
        """Approved VMAs, each with its last tunnel login; tunnel_up when the VMA's API forward is listening."""
        return await self.enrollments.active()

    @route("GET", "/admin/vma/audit", query=AuditQuery, auth=Auth.ADMIN, tags=("vma",))
    async def audit(self, call: Call) -> dict[str, Any]:
        """Enrollment events, newest first: who did what, from where, and the outcome."""
        q: AuditQuery = call.query
        return await self.enrollments.events(q.event_type, q.limit)
