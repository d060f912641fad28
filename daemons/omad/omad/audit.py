"""The audit trail: who did what to which resource, from where, and how it ended."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from oma_common.logs import caller_address

from .store import audit as store
from .store.db import Database, Tx, utcnow

log = logging.getLogger("omad.audit")


class Audit:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, actor: str, action: str, resource: str = "", *, outcome: str = "ok",
                     source: str = "", tx: Tx | None = None, **details: Any) -> None:
        """Write one audit row (inside `tx` when the action is part of a transaction), and its journal line once
        the row is committed.

        `source` defaults to the address of the caller whose request this is (empty for omactl and timers).
        """
        source = source or caller_address.get()
        entry = dict(at=utcnow(), actor=actor, action=action, resource=resource, outcome=outcome,
                     details=json.dumps(details, default=str), source=source)
        def logged() -> None:
            log.info("%s %s %s: %s", actor, action, resource or "-", outcome, extra={"resource": resource or "-"})

        if tx is not None:
            await store.append(tx, **entry)
            tx.after_commit(logged)  # the journal names only what was stored
        else:
            async with self.db.transaction() as own:
                await store.append(own, **entry)
            logged()

    async def recent(self, limit: int = 100, action: str | None = None, *, prefix: str | None = None
                     ) -> list[dict[str, Any]]:
        """The latest rows, of one action or of every action starting with `prefix` (e.g. "vma.")."""
        return [dataclasses.asdict(e) for e in await store.recent(self.db, limit, action, prefix=prefix)]
