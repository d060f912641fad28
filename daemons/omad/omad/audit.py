"""The audit trail: who did what to which resource, from where, and how it ended."""

from __future__ import annotations

import json
import logging
from typing import Any

from oma_common.logs import caller_address

from .store.db import Database, Tx, utcnow

log = logging.getLogger("omad.audit")


class Audit:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, actor: str, action: str, resource: str = "", *, outcome: str = "ok",
                     source: str = "", tx: Tx | None = None, **details: Any) -> None:
        """Write one audit row (inside `tx` when the action is part of a transaction).

        `source` defaults to the address of the caller whose request this is (empty for omactl and timers).
        """
        source = source or caller_address.get()
        params = (utcnow(), actor, action, resource, outcome, json.dumps(details, default=str), source)
        sql = ("INSERT INTO audit_log (at, actor, action, resource, outcome, details, source) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)")
        if tx is not None:
            await tx.execute(sql, params)
        else:
            await self.db.execute(sql, params)
        log.info("%s %s %s: %s", actor, action, resource or "-", outcome, extra={"resource": resource or "-"})

    async def recent(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        if action:
            rows = await self.db.fetchall("SELECT * FROM audit_log WHERE action = ? ORDER BY id DESC LIMIT ?",
                                          (action, limit))
        else:
            rows = await self.db.fetchall("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (limit,))
        for r in rows:
            r["details"] = json.loads(r["details"])
        return rows
