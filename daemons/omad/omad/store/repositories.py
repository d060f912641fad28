"""The owner of backup_repositories: where backups are stored, and the last storage check of each."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Reader, get_or_404, name_free, record
from .db import Writer


@dataclasses.dataclass(frozen=True)
class Repository:
    """A row of backup_repositories (`config` is the type's settings as JSON, never a password)."""

    id: str
    name: str
    type: str
    enabled: bool
    config: str
    secret_sealed: str | None
    root_path: str
    is_immutable: bool
    min_retention_days: int
    description: str
    created_by: str
    created_at: str
    updated_at: str
    total_bytes: int | None
    used_bytes: int | None
    available_bytes: int | None
    last_check_at: str | None
    last_check_error: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "is_immutable", bool(self.is_immutable))


def _repository(row: dict[str, Any]) -> Repository:
    return record(Repository, row)


async def get(db: Reader, repo_id: str) -> Repository:
    """The repository, or NotFound."""
    return _repository(await get_or_404(db, "SELECT * FROM backup_repositories WHERE id = ?", (repo_id,),
                                        what="repository", ident=repo_id))


async def find_one(db: Reader, repo_id: str) -> Repository | None:
    row = await db.fetchone("SELECT * FROM backup_repositories WHERE id = ?", (repo_id,))
    return _repository(row) if row is not None else None


async def exists(db: Reader, repo_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM backup_repositories WHERE id = ?", (repo_id,)))


async def listing(db: Reader, *, type: str | None, enabled: bool | None) -> list[tuple[Repository, int]]:
    """The repositories (of a type, enabled or not) by name, each with how many backups it holds."""
    e = None if enabled is None else int(enabled)
    rows = await db.fetchall(
        "SELECT r.*, (SELECT COUNT(*) FROM backup_jobs b WHERE b.repository_id = r.id) AS backup_count "
        "FROM backup_repositories r WHERE (? IS NULL OR r.type = ?) AND (? IS NULL OR r.enabled = ?) ORDER BY r.name",
        (type, type, e, e))
    return [(_repository(r), int(r["backup_count"])) for r in rows]


async def roots(db: Reader) -> list[tuple[str, str]]:
    """(name, root path) of every repository."""
    return [(r["name"], r["root_path"]) for r in await db.fetchall("SELECT name, root_path FROM backup_repositories")]


async def check_name_free(db: Reader, name: str) -> None:
    """Conflict when a repository has the name."""
    await name_free(db, "SELECT 1 FROM backup_repositories WHERE name = ?", (name,), what="repository", name=name)


async def create(tx: Writer, repo: Repository) -> None:
    """A new repository, as `repo` says (its first storage check included)."""
    values = dataclasses.astuple(repo)
    columns = ", ".join(f.name for f in dataclasses.fields(Repository))
    await tx.execute(f"INSERT INTO backup_repositories ({columns}) VALUES ({', '.join('?' * len(values))})", values)


async def record_check(db: Writer, repo_id: str, *, total_bytes: int, used_bytes: int, available_bytes: int,
                       now: str) -> None:
    """A storage check that worked."""
    await db.execute("UPDATE backup_repositories SET total_bytes = ?, used_bytes = ?, available_bytes = ?, "
                     "last_check_at = ?, last_check_error = NULL WHERE id = ?",
                     (total_bytes, used_bytes, available_bytes, now, repo_id))


async def record_check_error(db: Writer, repo_id: str, error: str, now: str) -> None:
    """A storage check that failed (the figures of the last good one stay)."""
    await db.execute("UPDATE backup_repositories SET last_check_at = ?, last_check_error = ? WHERE id = ?",
                     (now, error, repo_id))


async def set_secret(tx: Writer, repo_id: str, secret_sealed: str) -> None:
    """Store a password resealed for this row."""
    await tx.execute("UPDATE backup_repositories SET secret_sealed = ? WHERE id = ?", (secret_sealed, repo_id))


async def sealed_secrets(db: Reader) -> list[tuple[str, str]]:
    """(id, sealed password) of every repository that has one."""
    return [(str(r["id"]), str(r["secret_sealed"])) for r in await db.fetchall(
        "SELECT id, secret_sealed FROM backup_repositories WHERE secret_sealed IS NOT NULL ORDER BY id")]


async def delete(tx: Writer, repo_id: str) -> None:
    await tx.execute("DELETE FROM backup_repositories WHERE id = ?", (repo_id,))
