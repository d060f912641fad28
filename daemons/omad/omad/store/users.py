"""Who may call omad: users, API tokens, the sessions both open, and omad's own settings."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from .base import Reader, name_free, record
from .db import Writer

TRANSITIONS: tuple[str, ...] = ()  # no status column (a token's revocation is its revoked_at)


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"


@dataclasses.dataclass(frozen=True)
class User:
    id: int
    username: str
    password_hash: str = dataclasses.field(repr=False)
    role: Role
    disabled: bool
    created_at: str
    updated_at: str


@dataclasses.dataclass(frozen=True)
class ApiToken:
    id: int
    name: str
    token_hash: str = dataclasses.field(repr=False)
    role: Role
    appliance_id: str | None
    created_by: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None


@dataclasses.dataclass(frozen=True)
class SessionOwner:
    """A session and whoever opened it: a user (username set) or an API token (token_name set)."""

    expires_at: str
    username: str | None
    user_role: Role | None
    user_disabled: bool
    token_name: str | None
    token_role: Role | None
    token_revoked_at: str | None


def _user(row: Mapping[str, Any]) -> User:
    return record(User, {**row, "role": Role(row["role"]), "disabled": bool(row["disabled"])})


def _token(row: Mapping[str, Any]) -> ApiToken:
    return record(ApiToken, {**row, "role": Role(row["role"])})


# -- users ---------------------------------------------------------------------------------------------------

async def user_by_name(db: Reader, username: str) -> User | None:
    row = await db.fetchone("SELECT * FROM users WHERE username = ?", (username,))
    return _user(row) if row is not None else None


async def users(db: Reader) -> list[User]:
    return [_user(r) for r in await db.fetchall("SELECT * FROM users ORDER BY username")]


async def add_user(tx: Writer, username: str, password_hash: str, role: Role, now: str) -> int:
    await name_free(tx, "SELECT 1 FROM users WHERE username = ?", (username,), what="user", name=username)
    return await tx.execute("INSERT INTO users (username, password_hash, role, created_at, updated_at) "
                            "VALUES (?, ?, ?, ?, ?)", (username, password_hash, role.value, now, now))


async def set_password(tx: Writer, user_id: int, password_hash: str, now: str) -> None:
    """A changed password ends the user's sessions."""
    await tx.execute("UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ?", (password_hash, now, user_id))
    await tx.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))


# -- API tokens ----------------------------------------------------------------------------------------------

async def tokens(db: Reader) -> list[ApiToken]:
    return [_token(r) for r in await db.fetchall("SELECT * FROM api_tokens ORDER BY name")]


async def add_token(tx: Writer, name: str, token_hash: str, role: Role, *, appliance_id: str | None, created_by: str,
                    now: str, expires_at: str | None) -> int:
    await name_free(tx, "SELECT 1 FROM api_tokens WHERE name = ?", (name,), what="token", name=name)
    return await tx.execute("INSERT INTO api_tokens (name, token_hash, role, appliance_id, created_by, created_at,"
                            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (name, token_hash, role.value, appliance_id, created_by, now, expires_at))


async def active_token_named(db: Reader, name: str) -> ApiToken | None:
    """The unrevoked token with this name (expiry is the caller's to judge)."""
    row = await db.fetchone("SELECT * FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,))
    return _token(row) if row is not None else None


async def active_token_by_hash(db: Reader, token_hash: str) -> ApiToken | None:
    """The unrevoked token with this digest (expiry is the caller's to judge)."""
    row = await db.fetchone("SELECT * FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,))
    return _token(row) if row is not None else None


async def revoke_token(tx: Writer, token_id: int, now: str) -> None:
    """Revoking ends the token's sessions."""
    await tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now, token_id))
    await tx.execute("DELETE FROM sessions WHERE api_token_id = ?", (token_id,))


async def token_used(tx: Writer, token_id: int, now: str) -> None:
    await tx.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, token_id))


# -- sessions ------------------------------------------------------------------------------------------------

async def open_session(tx: Writer, token_hash: str, *, user_id: int | None, api_token_id: int | None, source: str,
                       client_version: str | None, now: str, expires_at: str) -> None:
    """Expired sessions go first, so the table holds only live ones and those of the last hours."""
    await tx.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
    await tx.execute("INSERT INTO sessions (token_hash, user_id, api_token_id, source, client_version, "
                     "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (token_hash, user_id, api_token_id, source, client_version, now, expires_at))


async def close_session(tx: Writer, token_hash: str) -> None:
    await tx.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))


async def session_owner(db: Reader, token_hash: str) -> SessionOwner | None:
    row = await db.fetchone(
        "SELECT s.expires_at, u.username, u.role AS user_role, u.disabled AS user_disabled, t.name AS token_name, "
        "t.role AS token_role, t.revoked_at AS token_revoked_at FROM sessions s "
        "LEFT JOIN users u ON u.id = s.user_id LEFT JOIN api_tokens t ON t.id = s.api_token_id "
        "WHERE s.token_hash = ?", (token_hash,))
    if row is None:
        return None
    return record(SessionOwner, {
        **row, "user_disabled": bool(row["user_disabled"]),
        "user_role": Role(row["user_role"]) if row["user_role"] else None,
        "token_role": Role(row["token_role"]) if row["token_role"] else None})


# -- settings ------------------------------------------------------------------------------------------------

async def setting(db: Reader, key: str) -> str | None:
    value = await db.scalar("SELECT value FROM settings WHERE key = ?", (key,))
    return str(value) if value is not None else None


async def put_setting(tx: Writer, key: str, value: str) -> None:
    await tx.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
