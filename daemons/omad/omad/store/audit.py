"""The audit trail (audit_log): append-only rows of who did what to which resource, and how it ended."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .base import Reader, record
from .db import Tx

TRANSITIONS: tuple[str, ...] = ()  # no status column (`outcome` is written once, with the row)


@dataclasses.dataclass(frozen=True)
class Entry:
    id: int
    at: str
    actor: str
    action: str
    resource: str
    outcome: str
    details: dict[str, Any]
    source: str


async def append(tx: Tx, *, at: str, actor: str, action: str, resource: str, outcome: str, details: str,
                 source: str) -> None:
    """`details` is the JSON object text."""
    await tx.execute("INSERT INTO audit_log (at, actor, action, resource, outcome, details, source) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (at, actor, action, resource, outcome, details, source))


async def recent(db: Reader, limit: int, action: str | None = None) -> list[Entry]:
    """The newest entries first, of one action or of all."""
    rows = await db.fetchall("SELECT * FROM audit_log WHERE ? IS NULL OR action = ? ORDER BY id DESC LIMIT ?",
                             (action, action, limit))
    return [record(Entry, {**r, "details": json.loads(r["details"])}) for r in rows]
