"""The GUI's VM list (up to 10,000 items, 10 MB of JSON) kept rendered between changes, and its whole-list body.

Each item is rendered by SQLite once and kept as bytes, ordered by VM name. Triggers record which contexts
each change touched and bump a generation (migration 0010): at a new generation only those items are rendered
again. The whole list is written once per generation into an in-memory file (in a worker thread, so the loop
keeps serving), and every request for it sends that file with sendfile(2).

Freshness: a request reads the generation first and is answered with a rendering at least that new, so a
change committed before the request (through the API or any other connection) is in its answer.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence

from oma_common.blocking import run_blocking

from ..adapters import memfile
from ..store import contexts as store
from ..store.contexts import Rendered
from ..store.db import Database

# More changed contexts than this since the last render: render the whole list again instead.
FULL_RENDER_AFTER = 1000
# Versions name the process too: a generation number alone could repeat after a restore of the database.
_BOOT = secrets.token_hex(4)


def _key(r: Rendered) -> tuple[str, str]:
    return (r.vm_name, r.context_id)  # SQLite's BINARY order of vm_name is Python's order of str


@dataclasses.dataclass(frozen=True)
class Listing:
    """One answer of the list: the items as a JSON array, either in memory (`array`, a page) or in an open
    file (`fd`, `size`: the whole list, open while the listing is held), how many it holds, how many exist,
    and `version`, which changes with every change the list shows (an ETag)."""

    count: int
    total: int
    version: str
    array: bytes | None = None
    fd: int | None = None
    size: int = 0


@dataclasses.dataclass(frozen=True)
class _Body:
    generation: int
    count: int
    file: memfile.SharedFile


class KeptList:
    """The list, kept rendered: at each change generation only the changed contexts are rendered again."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.generation = -1
        self.entries: list[Rendered] = []  # by _key
        self.items: list[bytes] = []  # the entries' JSON, in the same order
        self._by_id: dict[str, Rendered] = {}
        self._pending: asyncio.Future[None] | None = None  # the refresh running
        self._files = memfile.FilePool("vm-contexts")
        self._body: _Body | None = None  # the newest whole-list file written
        self._writing: tuple[int, asyncio.Future[None]] | None = None  # the whole-list file being written

    @property
    def built(self) -> bool:
        return self.generation >= 0

    @contextlib.asynccontextmanager
    async def listing(self, limit: int | None, offset: int) -> AsyncIterator[Listing]:
        """A page (limit None: the whole list), at least as new as every change committed before the call."""
        generation = await store.generation(self.db)
        if limit is not None and not self.built:
            # A page before the first whole render: cheaper to render the page alone.
            items, total = await store.render_page(self.db, limit, offset)
            yield Listing(len(items), total, f"{_BOOT}-{generation}", array=_array(items))
            return
        await self._refresh(generation)
        if limit is None and offset == 0:
            body = await self._whole(self.generation)
            with body.file.held() as fd:
                yield Listing(body.count, body.count, f"{_BOOT}-{body.generation}", fd=fd, size=body.file.size)
            return
        page = self.items[offset:] if limit is None else self.items[offset:offset + limit]
        yield Listing(len(page), len(self.items), f"{_BOOT}-{self.generation}", array=_array(page))

    # -- following the changes -------------------------------------------------------------------------------

    async def _refresh(self, generation: int) -> None:
        # Requests that arrive while a refresh runs wait for it, then refresh again if it started before their
        # generation: under a stream of changes one refresh runs at a time and each catches up on all of them.
        while self.generation < generation:
            if self._pending is not None:
                await asyncio.shield(self._pending)
                continue
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending = future
            try:
                await self._catch_up(generation)
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)
                future.exception()  # retrieved here: a failure nobody waited for is not "never retrieved"
                raise
            finally:
                self._pending = None

    async def _catch_up(self, generation: int) -> None:
        # `generation` was read before the queries below, so they see at least every change up to it.
        if self.built:
            newest, changed = await store.changed_since(self.db, self.generation)
            if len(changed) <= FULL_RENDER_AFTER:
                self._apply(changed, await store.render_some(self.db, changed) if changed else [])
                self.generation = max(generation, newest, self.generation)
                return
        entries = await store.render_all(self.db)
        if generation > self.generation:
            self.entries = entries
            self.items = [e.item.encode() for e in entries]
            self._by_id = {e.context_id: e for e in entries}
            self.generation = generation

    def _apply(self, changed: Sequence[str], fresh: Sequence[Rendered]) -> None:
        for context_id in changed:
            old = self._by_id.pop(context_id, None)
            if old is not None:
                i = bisect.bisect_left(self.entries, _key(old), key=_key)
                del self.entries[i], self.items[i]
        for entry in fresh:
            i = bisect.bisect_left(self.entries, _key(entry), key=_key)
            self.entries.insert(i, entry)
            self.items.insert(i, entry.item.encode())
            self._by_id[entry.context_id] = entry

    # -- the whole list's body -------------------------------------------------------------------------------

    async def _whole(self, generation: int) -> _Body:
        """The whole list's file of `generation` or newer: written once per generation, shared by requests."""
        while self._body is None or self._body.generation < generation:
            if self._writing is None or self._writing[0] < generation:
                task = asyncio.ensure_future(self._write(self.generation, list(self.items)))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure is the waiters'
                self._writing = (self.generation, task)
            await asyncio.shield(self._writing[1])
        return self._body

    async def _write(self, generation: int, items: list[bytes]) -> None:
        pieces = [b"[", b"]"]
        if items:  # "[", item, ",", item, …, item, "]": written straight from the kept items, never joined
            pieces = [b","] * (2 * len(items) + 1)
            pieces[0], pieces[-1] = b"[", b"]"
            pieces[1::2] = items
        try:
            # Cancelled (omad stopping), the file the thread then writes goes back to the pool, not to the GC.
            file = await run_blocking(self._files.write, pieces, undo=memfile.SharedFile.retire)
            if self._body is None or self._body.generation < generation:
                old, self._body = self._body, _Body(generation, len(items), file)
                if old is not None:
                    old.file.retire()  # reused once the requests sending it are done
            else:
                file.retire()
        finally:
            if self._writing is not None and self._writing[0] == generation:
                self._writing = None


def _array(items: Sequence[str] | Sequence[bytes]) -> bytes:
    encoded = [i.encode() if isinstance(i, str) else i for i in items]
    return b"[" + b",".join(encoded) + b"]"
