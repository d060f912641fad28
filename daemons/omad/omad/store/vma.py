"""VMA enrollment's tables: pairing codes, enrollments and their status transitions, and tunnel logins."""

from __future__ import annotations

import dataclasses
import enum

from oma_common.errors import Conflict

from .base import Reader, get_or_404, record
from .db import Writer

# The only writer of vma_enrollments.status (tests/omad/test_store_rules.py holds us to it): the transitions
# mark_verified, approve, reject, revoke and expire_stale all move the status through it.
TRANSITIONS = ("_move",)


class EnrollmentStatus(enum.StrEnum):
    PENDING_VERIFICATION = "pending_verification"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclasses.dataclass(frozen=True)
class PairingCode:
    id: str
    code_digest: str
    created_by: str
    created_at: str
    expires_at: str
    used_at: str | None
    enrollment_id: str | None


@dataclasses.dataclass(frozen=True)
class Enrollment:
    id: str
    pairing_code_id: str
    public_key: str
    key_fingerprint: str
    vma_name: str
    vma_version: str
    vma_fingerprint: str
    source: str
    challenge: str
    challenge_expires_at: str
    challenge_used_at: str | None
    status: EnrollmentStatus
    created_at: str
    verified_at: str | None
    expires_at: str
    decided_by: str | None
    decided_at: str | None
    notes: str
    reason: str
    revoked_by: str | None
    revoked_at: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", EnrollmentStatus(self.status))


@dataclasses.dataclass(frozen=True)
class TunnelLogin:
    monitor_pid: int
    monitor_start: float
    enrollment_id: str
    key_fingerprint: str
    at: str


# -- pairing codes -------------------------------------------------------------------------------------------

async def add_pairing_code(tx: Writer, code_id: str, digest: str, *, created_by: str, now: str, expires_at: str) -> None:
    await tx.execute("INSERT INTO vma_pairing_codes (id, code_digest, created_by, created_at, expires_at) "
                     "VALUES (?, ?, ?, ?, ?)", (code_id, digest, created_by, now, expires_at))


async def live_pairing_codes(db: Reader, now: str) -> list[PairingCode]:
    """Codes not used and not expired: the only ones an enrollment may present."""
    rows = await db.fetchall("SELECT * FROM vma_pairing_codes WHERE used_at IS NULL AND expires_at > ?", (now,))
    return [record(PairingCode, r) for r in rows]


async def find_pairing_code(db: Reader, digest: str) -> PairingCode | None:
    """Any code with this digest, live or not (to say why a code was refused)."""
    row = await db.fetchone("SELECT * FROM vma_pairing_codes WHERE code_digest = ?", (digest,))
    return record(PairingCode, row) if row else None


async def use_pairing_code(tx: Writer, code_id: str, enrollment_id: str, now: str) -> None:
    """Single use: only an unused code can be taken, by one enrollment."""
    if not await tx.execute("UPDATE vma_pairing_codes SET used_at = ?, enrollment_id = ? "
                            "WHERE id = ? AND used_at IS NULL", (now, enrollment_id, code_id)):
        raise Conflict("pairing code already used", "the pairing code was used by another enrollment")


# -- enrollments ---------------------------------------------------------------------------------------------

async def add_enrollment(tx: Writer, e: Enrollment) -> None:
    row = dataclasses.asdict(e)
    row["status"] = str(e.status)
    cols = ", ".join(row)
    await tx.execute(f"INSERT INTO vma_enrollments ({cols}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608
                     tuple(row.values()))


async def get_enrollment(db: Reader, enrollment_id: str) -> Enrollment:
    row = await get_or_404(db, "SELECT * FROM vma_enrollments WHERE id = ?", (enrollment_id,),
                           what="enrollment", ident=enrollment_id)
    return record(Enrollment, row)


async def enrollments(db: Reader, *statuses: EnrollmentStatus) -> list[Enrollment]:
    marks = ", ".join("?" * len(statuses))
    rows = await db.fetchall(f"SELECT * FROM vma_enrollments WHERE status IN ({marks}) "  # noqa: S608
                             "ORDER BY created_at, id", tuple(str(s) for s in statuses))
    return [record(Enrollment, r) for r in rows]


async def approved_by_fingerprint(db: Reader, fingerprint: str) -> Enrollment | None:
    row = await db.fetchone("SELECT * FROM vma_enrollments WHERE key_fingerprint = ? AND status = 'approved'",
                            (fingerprint,))
    return record(Enrollment, row) if row else None


async def _move(tx: Writer, enrollment_id: str, frm: tuple[EnrollmentStatus, ...], to: EnrollmentStatus,
                sets: dict[str, object]) -> None:
    assignments = ", ".join(f"{k} = ?" for k in sets)
    marks = ", ".join("?" * len(frm))
    changed = await tx.execute(
        f"UPDATE vma_enrollments SET status = ?{', ' if sets else ''}{assignments} "  # noqa: S608
        f"WHERE id = ? AND status IN ({marks})",
        (str(to), *sets.values(), enrollment_id, *(str(s) for s in frm)))
    if not changed:
        current = await tx.scalar("SELECT status FROM vma_enrollments WHERE id = ?", (enrollment_id,))
        raise Conflict(f"enrollment is {current}", f"enrollment {enrollment_id} is {current}; it cannot become {to}")


async def consume_challenge(tx: Writer, enrollment_id: str, now: str) -> None:
    """A challenge answers one verification attempt, right or wrong."""
    if not await tx.execute("UPDATE vma_enrollments SET challenge_used_at = ? WHERE id = ? AND challenge_used_at IS NULL",
                            (now, enrollment_id)):
        raise Conflict("challenge already used", f"the challenge of enrollment {enrollment_id} was already answered; "
                                                 "enroll again with a new pairing code")


async def mark_verified(tx: Writer, enrollment_id: str, now: str) -> None:
    await _move(tx, enrollment_id, (EnrollmentStatus.PENDING_VERIFICATION,), EnrollmentStatus.AWAITING_APPROVAL,
                {"verified_at": now})


async def approve(tx: Writer, enrollment_id: str, *, by: str, notes: str, now: str) -> None:
    await _move(tx, enrollment_id, (EnrollmentStatus.AWAITING_APPROVAL,), EnrollmentStatus.APPROVED,
                {"decided_by": by, "decided_at": now, "notes": notes})


async def reject(tx: Writer, enrollment_id: str, *, by: str, reason: str, now: str) -> None:
    """The administrator's refusal, or a failed proof of possession (by the enrollment's own attempt)."""
    await _move(tx, enrollment_id, (EnrollmentStatus.PENDING_VERIFICATION, EnrollmentStatus.AWAITING_APPROVAL),
                EnrollmentStatus.REJECTED, {"decided_by": by, "decided_at": now, "reason": reason})


async def revoke(tx: Writer, enrollment_id: str, *, by: str, now: str) -> None:
    await _move(tx, enrollment_id, (EnrollmentStatus.APPROVED,), EnrollmentStatus.REVOKED,
                {"revoked_by": by, "revoked_at": now})


async def expire_stale(tx: Writer, now: str) -> list[str]:
    """Enrollments whose challenge (not yet answered) or approval window ran out become expired."""
    rows = await tx.fetchall(
        "SELECT id FROM vma_enrollments WHERE (status = 'pending_verification' AND challenge_expires_at <= ?) "
        "OR (status IN ('pending_verification', 'awaiting_approval') AND expires_at <= ?)", (now, now))
    ids = [r["id"] for r in rows]
    for i in ids:
        await _move(tx, i, (EnrollmentStatus.PENDING_VERIFICATION, EnrollmentStatus.AWAITING_APPROVAL),
                    EnrollmentStatus.EXPIRED, {})
    return ids


# -- tunnel logins -------------------------------------------------------------------------------------------

async def record_login(tx: Writer, login: TunnelLogin) -> None:
    await tx.execute("INSERT OR REPLACE INTO vma_tunnel_logins (monitor_pid, monitor_start, enrollment_id, "
                     "key_fingerprint, at) VALUES (?, ?, ?, ?, ?)", dataclasses.astuple(login))


async def logins(db: Reader, enrollment_id: str | None = None) -> list[TunnelLogin]:
    if enrollment_id is None:
        rows = await db.fetchall("SELECT * FROM vma_tunnel_logins ORDER BY at")
    else:
        rows = await db.fetchall("SELECT * FROM vma_tunnel_logins WHERE enrollment_id = ? ORDER BY at",
                                 (enrollment_id,))
    return [record(TunnelLogin, r) for r in rows]


async def forget_login(tx: Writer, login: TunnelLogin) -> None:
    await tx.execute("DELETE FROM vma_tunnel_logins WHERE monitor_pid = ? AND monitor_start = ? "
                     "AND enrollment_id = ?", (login.monitor_pid, login.monitor_start, login.enrollment_id))
