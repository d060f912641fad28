"""What every table's owner in store/ shares: typed records built from rows, and lookups that say 404 or 409."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from oma_common.errors import Conflict, NotFound

T = TypeVar("T")


class Reader(Protocol):
    """A Database or a Tx: anything a store function can read through."""

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ...) -> dict[str, Any] | None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ...) -> list[dict[str, Any]]: ...

    async def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ...) -> Any: ...


def record(cls: type[T], row: Mapping[str, Any]) -> T:
    """Build the dataclass `cls` from a row: its fields are taken by name, other columns are ignored."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: row[n] for n in names if n in row})


async def get_or_404(db: Reader, sql: str, params: Sequence[Any], *, what: str, ident: object) -> dict[str, Any]:
    """The one row `sql` selects, or NotFound naming `what` and `ident` ("VM context 'x' does not exist")."""
    row = await db.fetchone(sql, params)
    if row is None:
        raise NotFound(f"{what} not found", f"{what} {ident!r} does not exist")
    return row


async def name_free(db: Reader, sql: str, params: Sequence[Any], *, what: str, name: str) -> None:
    """Conflict when `sql` finds a row: a `what` named `name` already exists."""
    if await db.scalar(sql, params):
        raise Conflict(f"{what} exists", f"a {what} named {name!r} already exists")
