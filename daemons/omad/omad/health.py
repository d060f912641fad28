"""The appliance's health: the database, the storage of omad's state and each agent; degraded when any part is
not well."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from oma_common import __version__
from oma_common.errors import OmaError
from oma_common.web import now_rfc3339

from .adapters.localfs import LocalFs
from .clients.agents import Agents
from .store.db import NEARLY_FULL_BYTES, Database

log = logging.getLogger(__name__)

# Told each report's components (name → the agent's own report): what an agent's health says about the
# resources omad records (restore-mounter's broken mounts) is news omad writes down.
Watcher = Callable[[Mapping[str, Mapping[str, Any]]], Awaitable[None]]

SPACE_BACK_BYTES = NEARLY_FULL_BYTES  # freed since a refused write: space is back (it is tried again)


class StateStorage:
    """The file system holding omad's state directory (its database): free space, and the last write the
    database refused because it was full."""

    def __init__(self, state_dir: Path, db: Database, fs: LocalFs, min_free_bytes: int) -> None:
        self.state_dir = state_dir
        self.db = db
        self.fs = fs
        self.min_free_bytes = min_free_bytes

    async def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "path": str(self.state_dir), "min_free_bytes": self.min_free_bytes}
        try:
            capacity = await self.fs.capacity(self.state_dir)
        except OmaError as e:
            return {**out, "status": "error", "message": f"{e.message}: {e.details}"}
        free = capacity.available_bytes
        out.update(free_bytes=free, total_bytes=capacity.total_bytes)
        problems = []
        if free < self.min_free_bytes:
            problems.append(f"the storage of omad's state is nearly full: {free} bytes free in {self.state_dir}, "
                            f"below the {self.min_free_bytes} bytes wanted; free space there")
        refused = self.db.refused
        # A refused write is news until a write commits, or until space came back since (nothing may write soon).
        if refused is not None and (free < self.min_free_bytes or refused.free_bytes is None
                                    or free < refused.free_bytes + SPACE_BACK_BYTES):
            out["write_refused_at"] = refused.at
            problems.append(f"the last database write was refused at {refused.at}, the storage being full: "
                            f"{refused.details}")
        if problems:
            out.update(status="degraded", message="; ".join(problems))
        return out


class Health:
    def __init__(self, db: Database, agents: Agents, storage: StateStorage,
                 watchers: Sequence[Watcher] = ()) -> None:
        self.db = db
        self.agents = agents
        self.storage = storage
        self.watchers = tuple(watchers)

    async def report(self, *, detailed: bool) -> dict[str, Any]:
        db_ok = await self.db.ping()
        storage = await self.storage.report()
        database: dict[str, Any] = {"status": "ok" if db_ok else "error"}
        if db_ok and "write_refused_at" in storage:  # it reads, but does not write
            database.update(status="degraded", message="its last write was refused: the storage is full (see "
                                                       "storage)")
        components: dict[str, Any] = {"database": database, "storage": storage}
        components.update(await self.agents.health())
        for watch in self.watchers:
            try:
                await watch(components)
            except Exception:  # the report is still due; what went wrong goes to the log
                log.exception("a health watcher failed")
        healthy = db_ok and all(c.get("status") == "ok" for c in components.values())
        if not detailed:
            components = {name: {"status": c.get("status", "unknown")} for name, c in components.items()}
        return {"service": "OMA API", "status": "healthy" if healthy else "degraded", "timestamp": now_rfc3339(),
                "version": __version__, "database": "connected" if db_ok else "error", "components": components}
