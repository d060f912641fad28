"""The audit trail (audit_log): append-only rows of who did what to which resource, and how it ended."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .base import Reader, record
from .db import Writer

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


async def append(tx: Writer, *, at: str, actor: str, action: str, resource: str, outcome: str, details: str,
                 source: str) -> None:
    """`details` is the JSON object text."""
    await tx.execute("INSERT INTO audit_log (at, actor, action, resource, outcome, details, source) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (at, actor, action, resource, outcome, details, source))


async def recent(db: Reader, limit: int, action: str | None = None, *, prefix: str | None = None) -> list[Entry]:
    """The newest entries first, of one action, of every action starting with `prefix` (e.g. "vma."), or all."""
    if prefix:
        rows = await db.fetchall("SELECT * FROM audit_log WHERE substr(action, 1, ?) = ? ORDER BY id DESC LIMIT ?",
                                 (len(prefix), prefix, limit))
    else:
        rows = await db.fetchall("SELECT * FROM audit_log WHERE ? IS NULL OR action = ? ORDER BY id DESC LIMIT ?",
                                 (action, action, limit))
    return [record(Entry, {**r, "details": json.loads(r["details"])}) for r in rows]
