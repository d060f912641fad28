"""VMA enrollment: pairing codes, proof that the VMA holds its Ed25519 key, the administrator's decision,
revocation (which ends the VMA's live tunnel), and the key lines sshd asks for.

A pairing code is single use, expires, is kept only as a digest and is compared in constant time. The
challenge is 32 random bytes (64 hex), answers one verification attempt, and expires; a wrong signature
rejects the enrollment. Nothing is trusted before an administrator approves a verified enrollment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import secrets
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from oma_common.contracts.volume_agent import MAX_SESSIONS, SessionIn, Terminated
from oma_common.errors import Conflict, Invalid, OmaError, Unauthorized

from ..audit import Audit
from ..config import Config
from ..auth.ratelimit import FailureLimiter
from ..store import vma as store
from ..store.db import Database
from ..store.vma import Enrollment, EnrollmentStatus, TunnelLogin
from . import keys
from .tunnel import TunnelSpec, vma_tunnel_up

log = logging.getLogger(__name__)

ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
CODE_LENGTH = 12
EVENT_PREFIX = "vma."

MESSAGES = {
    EnrollmentStatus.PENDING_VERIFICATION: "sign the challenge with the VMA key and send it to /vma/enroll/verify",
    EnrollmentStatus.AWAITING_APPROVAL: "the key is verified; waiting for an administrator to approve",
    EnrollmentStatus.APPROVED: "approved: open the SSH tunnel as the given user",
    EnrollmentStatus.REJECTED: "the enrollment was rejected",
    EnrollmentStatus.EXPIRED: "the enrollment expired; enroll again with a new pairing code",
    EnrollmentStatus.REVOKED: "the VMA's access was revoked",
}


class TunnelSessions(Protocol):
    """Ends sshd sessions (volume-agent does: it runs as root)."""

    async def end_tunnel_sessions(self, sessions: list[SessionIn]) -> Terminated: ...


@dataclasses.dataclass
class Limits:
    challenge_ttl: float
    approval_ttl: float
    max_code_ttl: float


@dataclasses.dataclass
class EnrollRequest:
    pairing_code: str
    public_key: str
    vma_name: str
    vma_version: str = ""
    vma_fingerprint: str = ""


def _ts(dt: datetime) -> str:
    """Stored form (sorts as text), the same as store.db.utcnow()."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _code_digest(code: str) -> str:
    return hashlib.sha256(normalise_code(code).encode()).hexdigest()


def normalise_code(code: str) -> str:
    return "".join(c for c in code.upper() if c not in "- ")


def new_code() -> str:
    raw = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i:i + 4] for i in range(0, CODE_LENGTH, 4))


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Enrollments:
    def __init__(self, db: Database, audit: Audit, sessions: TunnelSessions, spec: Callable[[], TunnelSpec],
                 limits: Limits, *, calls: FailureLimiter, failures: FailureLimiter, host_key: Path,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.db = db
        self.audit = audit
        self.sessions = sessions
        self.spec = spec
        self.limits = limits
        self.calls = calls  # every public call, per address
        self.failures = failures  # wrong codes and signatures, per address
        self.host_key = host_key
        self.clock = clock

    @classmethod
    def from_config(cls, cfg: Config, db: Database, audit: Audit, sessions: TunnelSessions) -> Enrollments:
        """VMA enrollment as omad and omactl build it."""
        e = cfg.enrollment

        def spec() -> TunnelSpec:
            port = urlsplit(cfg.api_base_url()).port or cfg.api.port
            return TunnelSpec.of(e.tunnel_user, port, e.nbd_port_first, e.nbd_port_last, cfg.vma.url)

        return cls(db, audit, sessions, spec,
                   Limits(e.challenge_ttl_seconds, e.approval_ttl_seconds, e.max_code_ttl_seconds),
                   calls=FailureLimiter(e.rate_limit, e.rate_window_seconds, what="enrollment calls"),
                   failures=FailureLimiter(e.failure_limit, e.failure_window_seconds, what="failed enrollment attempts"),
                   host_key=Path(e.ssh_host_key))

    def _now(self) -> tuple[datetime, str]:
        now = self.clock()
        return now, _ts(now)

    async def _expire(self) -> None:
        async with self.db.transaction() as tx:
            expired = await store.expire_stale(tx, self._now()[1])
            for eid in expired:
                await self.audit.record("omad", "vma.expire", f"enrollment:{eid}", tx=tx)

    # -- administrator -------------------------------------------------------------------------------------

    async def create_pairing_code(self, valid_for: int, *, generated_by: str | None, actor: str) -> dict[str, Any]:
        if not 60 <= valid_for <= self.limits.max_code_ttl:
            raise Invalid("invalid validity", f"valid_for must be 60–{int(self.limits.max_code_ttl)} seconds")
        code = new_code()
        code_id = f"pc-{secrets.token_hex(6)}"
        now, stamp = self._now()
        expires = _ts(now + timedelta(seconds=valid_for))
        async with self.db.transaction() as tx:
            await store.add_pairing_code(tx, code_id, _code_digest(code), created_by=generated_by or actor,
                                         now=stamp, expires_at=expires)
            await self.audit.record(actor, "vma.pairing_code.create", f"pairing_code:{code_id}", tx=tx,
                                    generated_by=generated_by or actor, valid_for=valid_for, expires_at=expires)
        return {"pairing_code": code, "expires_at": expires, "valid_for": valid_for}

    async def pending(self) -> dict[str, Any]:
        await self._expire()
        rows = await store.enrollments(self.db, EnrollmentStatus.AWAITING_APPROVAL,
                                       EnrollmentStatus.PENDING_VERIFICATION)
        items = [self._view(e) for e in rows]
        return {"count": len(items), "enrollments": items}

    async def everything(self) -> list[dict[str, Any]]:
        await self._expire()
        return [self._view(e) for e in await store.enrollments(self.db, *EnrollmentStatus)]

    async def approve(self, enrollment_id: str, *, approved_by: str | None, notes: str, actor: str) -> dict[str, Any]:
        await self._expire()
        by = approved_by or actor
        try:
            async with self.db.transaction() as tx:
                e = await store.get_enrollment(tx, enrollment_id)
                await store.approve(tx, enrollment_id, by=by, notes=notes, now=self._now()[1])
                await self.audit.record(actor, "vma.approve", f"enrollment:{enrollment_id}", tx=tx, approved_by=by,
                                        notes=notes, vma_name=e.vma_name, key_fingerprint=e.key_fingerprint)
        except sqlite3.IntegrityError as exc:
            raise Conflict("key already approved", "another approved enrollment has the same key; revoke it "
                                                   "first") from exc
        log.info("VMA %s approved by %s", e.vma_name, by, extra={"resource": enrollment_id})
        user = self.spec().user
        return {"success": True, "message": f"VMA {e.vma_name} approved; its key may open the tunnel as {user}",
                "status": str(EnrollmentStatus.APPROVED), "ssh_user": user, "enrollment_id": enrollment_id}

    async def reject(self, enrollment_id: str, *, rejected_by: str | None, reason: str, actor: str) -> dict[str, Any]:
        await self._expire()
        by = rejected_by or actor
        async with self.db.transaction() as tx:
            e = await store.get_enrollment(tx, enrollment_id)
            await store.reject(tx, enrollment_id, by=by, reason=reason, now=self._now()[1])
            await self.audit.record(actor, "vma.reject", f"enrollment:{enrollment_id}", tx=tx, rejected_by=by,
                                    reason=reason, vma_name=e.vma_name)
        return {"success": True, "message": f"enrollment of VMA {e.vma_name} rejected",
                "status": str(EnrollmentStatus.REJECTED), "enrollment_id": enrollment_id}

    async def revoke(self, enrollment_id: str, *, revoked_by: str | None, actor: str) -> dict[str, Any]:
        """The key stops being handed to sshd at once (the revocation commits first); then the sessions that
        logged in with it are ended by volume-agent."""
        by = revoked_by or actor
        async with self.db.transaction() as tx:
            e = await store.get_enrollment(tx, enrollment_id)
            await store.revoke(tx, enrollment_id, by=by, now=self._now()[1])
            await self.audit.record(actor, "vma.revoke", f"enrollment:{enrollment_id}", tx=tx, revoked_by=by,
                                    vma_name=e.vma_name, key_fingerprint=e.key_fingerprint)
        ended, error = await self._end_sessions(await store.logins(self.db, enrollment_id))
        await self.audit.record(actor, "vma.tunnel.terminate", f"enrollment:{enrollment_id}",
                                outcome="ok" if error is None else "failed", sessions=ended, error=error)
        message = f"VMA {e.vma_name} revoked; {len(ended)} tunnel session(s) ended"
        if error:
            message += f"; ending its sessions failed: {error}"
        return {"success": True, "message": message, "status": str(EnrollmentStatus.REVOKED),
                "enrollment_id": enrollment_id, "sessions_terminated": len(ended)}

    async def _end_sessions(self, found: list[TunnelLogin]) -> tuple[list[int], str | None]:
        if not found:
            return [], None
        ended: list[int] = []
        for at in range(0, len(found), MAX_SESSIONS):  # volume-agent takes at most MAX_SESSIONS per request
            batch = found[at:at + MAX_SESSIONS]
            try:
                answer = await self.sessions.end_tunnel_sessions([SessionIn(s.monitor_pid, s.monitor_start)
                                                                  for s in batch])
            except OmaError as e:
                log.warning("ending the tunnel sessions %s failed: %s", [s.monitor_pid for s in batch], e)
                return ended, str(e)
            async with self.db.transaction() as tx:
                for s in batch:
                    await store.forget_login(tx, s)
            ended += answer.terminated
        return ended, None

    async def active(self) -> dict[str, Any]:
        approved = await store.enrollments(self.db, EnrollmentStatus.APPROVED)
        spec = self.spec()
        connections = []
        for e in approved:
            seen = await store.logins(self.db, e.id)
            connections.append({**self._view(e), "last_login_at": seen[-1].at if seen else None,
                                "ssh_user": spec.user})
        return {"count": len(connections), "connections": connections,
                "tunnel_up": vma_tunnel_up(spec.user, spec.vma_listen)}

    async def events(self, event_type: str | None, limit: int) -> dict[str, Any]:
        if event_type is not None:
            wanted = event_type if event_type.startswith(EVENT_PREFIX) else EVENT_PREFIX + event_type
            rows = await self.audit.recent(limit, action=wanted)
        else:
            rows = await self.audit.recent(limit, prefix=EVENT_PREFIX)
        events = [{"id": r["id"], "event_type": r["action"].removeprefix(EVENT_PREFIX), "actor": r["actor"],
                   "resource": r["resource"], "outcome": r["outcome"], "source": r["source"],
                   "details": r["details"], "created_at": r["at"]} for r in rows]
        return {"count": len(events), "events": events, "filter": {"event_type": event_type, "limit": limit}}

    # -- the VMA (public calls) ----------------------------------------------------------------------------

    async def enroll(self, req: EnrollRequest, source: str) -> dict[str, Any]:
        self.calls.attempt(source)
        key = keys.parse(req.public_key)
        # Counted before the code is looked at, withdrawn when it matches (auth/ratelimit.py).
        tried = self.failures.attempt(source)
        await self._expire()
        digest = _code_digest(req.pairing_code)
        enrollment_id = f"enr-{secrets.token_hex(16)}"
        challenge = secrets.token_hex(32)
        now, stamp = self._now()
        actor = f"vma:{req.vma_name}"
        async with self.db.transaction() as tx:
            code = self._match(await store.live_pairing_codes(tx, stamp), digest)
            if code is not None:
                await store.use_pairing_code(tx, code, enrollment_id, stamp)
                await store.add_enrollment(tx, Enrollment(
                    id=enrollment_id, pairing_code_id=code, public_key=key.openssh + (f" {key.comment}" if key.comment else ""),
                    key_fingerprint=key.fingerprint, vma_name=req.vma_name, vma_version=req.vma_version,
                    vma_fingerprint=req.vma_fingerprint, source=source, challenge=challenge,
                    challenge_expires_at=_ts(now + timedelta(seconds=self.limits.challenge_ttl)),
                    challenge_used_at=None, status=EnrollmentStatus.PENDING_VERIFICATION, created_at=stamp,
                    verified_at=None, expires_at=_ts(now + timedelta(seconds=self.limits.approval_ttl)),
                    decided_by=None, decided_at=None, notes="", reason="", revoked_by=None, revoked_at=None))
                await self.audit.record(actor, "vma.enroll", f"enrollment:{enrollment_id}", tx=tx, source=source,
                                        pairing_code_id=code, key_fingerprint=key.fingerprint,
                                        vma_version=req.vma_version, vma_fingerprint=req.vma_fingerprint)
        if code is None:
            known = await store.find_pairing_code(self.db, digest)
            why = "unknown" if known is None else ("used" if known.used_at else "expired")
            await self.audit.record(actor, "vma.enroll", "", outcome="denied", source=source, reason=f"{why} pairing code",
                                    key_fingerprint=key.fingerprint)
            raise Unauthorized("invalid pairing code", "the pairing code is unknown, already used or expired")
        self.failures.withdraw(source, tried)
        log.info("VMA %s enrolled from %s with key %s", req.vma_name, source, key.fingerprint,
                 extra={"resource": enrollment_id})
        return {"enrollment_id": enrollment_id, "challenge": challenge,
                "status": str(EnrollmentStatus.PENDING_VERIFICATION),
                "message": MESSAGES[EnrollmentStatus.PENDING_VERIFICATION]}

    @staticmethod
    def _match(codes: list[store.PairingCode], digest: str) -> str | None:
        """Every live code is compared, in constant time, whatever matches first."""
        found = None
        for c in codes:
            if hmac.compare_digest(c.code_digest, digest):
                found = c.id
        return found

    async def verify(self, enrollment_id: str, signature: str, source: str) -> dict[str, Any]:
        self.calls.attempt(source)
        tried = self.failures.attempt(source)
        try:
            ok = await self._verify(enrollment_id, signature, source)
        except OmaError:
            self.failures.withdraw(source, tried)  # unknown, expired or answered: no signature was judged
            raise
        if not ok:
            raise Unauthorized("signature does not verify", "the signature is not the enrolled key's Ed25519 "
                                                            "signature of the challenge; the enrollment is rejected")
        self.failures.withdraw(source, tried)
        return {"status": str(EnrollmentStatus.AWAITING_APPROVAL), "enrollment_id": enrollment_id,
                "message": MESSAGES[EnrollmentStatus.AWAITING_APPROVAL]}

    async def _verify(self, enrollment_id: str, signature: str, source: str) -> bool:
        """Spend the challenge on this signature: awaiting approval when it verifies, rejected when not."""
        await self._expire()
        now = self._now()[1]
        async with self.db.transaction() as tx:
            e = await store.get_enrollment(tx, enrollment_id)
            if e.status is EnrollmentStatus.EXPIRED:
                raise Conflict("challenge expired", f"enrollment {enrollment_id} expired before its challenge was "
                                                    "answered; enroll again with a new pairing code")
            await store.consume_challenge(tx, enrollment_id, now)
            if e.status is not EnrollmentStatus.PENDING_VERIFICATION:
                raise Conflict(f"enrollment is {e.status}", f"enrollment {enrollment_id} is {e.status}; "
                                                            "its challenge cannot be answered again")
            ok = keys.verify(keys.parse(e.public_key), e.challenge, signature)
            if ok:
                await store.mark_verified(tx, enrollment_id, now)
            else:
                await store.reject(tx, enrollment_id, by="omad", reason="the challenge signature did not verify",
                                   now=now)
            await self.audit.record(f"vma:{e.vma_name}", "vma.verify", f"enrollment:{enrollment_id}", tx=tx,
                                    source=source, outcome="ok" if ok else "denied", key_fingerprint=e.key_fingerprint)
        return ok

    async def result(self, enrollment_id: str, source: str) -> dict[str, Any]:
        self.calls.attempt(source)
        await self._expire()
        e = await store.get_enrollment(self.db, enrollment_id)
        out: dict[str, Any] = {"enrollment_id": e.id, "status": str(e.status), "message": MESSAGES[e.status]}
        if e.status is EnrollmentStatus.REJECTED and e.reason:
            out["message"] += f": {e.reason}"
        if e.status is EnrollmentStatus.APPROVED:
            spec = self.spec()
            out.update(ssh_user=spec.user, ssh_options=spec.ssh_options(), host_key_hash=self._host_key_hash())
        return out

    def _host_key_hash(self) -> str:
        try:
            return keys.host_key_fingerprint(self.host_key.read_text())
        except OSError as e:
            log.warning("cannot read sshd's host key %s: %s", self.host_key, e)
            return ""

    # -- sshd (omactl vma authorized-keys, run by sshd as AuthorizedKeysCommand) ---------------------------

    async def authorized_keys(self, user: str, fingerprint: str | None, monitor: tuple[int, float],
                              alive: Callable[[int, float], bool]) -> list[str]:
        """The approved key lines for `user` (only the one with `fingerprint` when given). Each one handed out is
        recorded against the asking sshd process (`monitor`: its pid and start time), so that revoking the key
        can end that session; no record, no key."""
        spec = self.spec()
        if user != spec.user:
            return []
        now = self._now()[1]
        async with self.db.transaction() as tx:
            if fingerprint:
                one = await store.approved_by_fingerprint(tx, fingerprint)
                found = [one] if one else []
            else:
                found = await store.enrollments(tx, EnrollmentStatus.APPROVED)
            for old in await store.logins(tx):
                if not alive(old.monitor_pid, old.monitor_start):
                    await store.forget_login(tx, old)
            for e in found:
                await store.record_login(tx, TunnelLogin(monitor[0], monitor[1], e.id, e.key_fingerprint, now))
        return [spec.authorized_line(keys.parse(e.public_key), f"oma-vma:{e.id}") for e in found]

    @staticmethod
    def _view(e: Enrollment) -> dict[str, Any]:
        return {"id": e.id, "enrollment_id": e.id, "vma_name": e.vma_name, "vma_version": e.vma_version,
                "vma_fingerprint": e.vma_fingerprint, "key_fingerprint": e.key_fingerprint,
                "public_key": e.public_key, "status": str(e.status), "source": e.source, "created_at": e.created_at,
                "verified_at": e.verified_at, "expires_at": e.expires_at, "decided_by": e.decided_by,
                "decided_at": e.decided_at, "notes": e.notes, "reason": e.reason, "revoked_by": e.revoked_by,
                "revoked_at": e.revoked_at}

