"""Users, API tokens and sessions: login, bearer authentication, and the bootstrap administrator."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from oma_common.errors import Conflict, Invalid, NotFound, RateLimited, Unauthorized

from ..audit import Audit
from ..store.db import Database, utcnow
from . import secrets
from .ratelimit import FailureLimiter

log = logging.getLogger(__name__)

Role = Literal["admin", "operator"]
ROLES = ("admin", "operator")


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: str
    kind: Literal["user", "token", "loopback"]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


LOOPBACK_MACHINE = Principal("vma-tunnel", "machine", "loopback")


@dataclasses.dataclass
class Session:
    session_token: str
    expires_at: str
    principal: Principal


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


class AuthService:
    def __init__(self, db: Database, audit: Audit, *, session_ttl: float, limiter: FailureLimiter,
                 bootstrap_file: Path | None = None) -> None:
        self.db = db
        self.audit = audit
        self.session_ttl = session_ttl
        self.limiter = limiter
        #: Where the bootstrap administrator's first password was written; removed once it is changed.
        self.bootstrap_file = bootstrap_file

    # -- users -------------------------------------------------------------------------------------

    async def add_user(self, username: str, password: str, role: str = "operator", *, actor: str = "omactl") -> int:
        if role not in ROLES:
            raise Invalid("invalid role", f"role must be one of {', '.join(ROLES)}")
        if not username or len(username) > 64 or not username.isprintable():
            raise Invalid("invalid username", "a username is 1–64 printable characters")
        if len(password) < 8:
            raise Invalid("password too short", "a password has at least 8 characters")
        hashed = await secrets.hash_password(password)
        async with self.db.transaction() as tx:
            if await tx.scalar("SELECT 1 FROM users WHERE username = ?", (username,)):
                raise Conflict("user exists", f"a user named {username!r} already exists")
            now = utcnow()
            uid = await tx.execute("INSERT INTO users (username, password_hash, role, created_at, updated_at) "
                                   "VALUES (?, ?, ?, ?, ?)", (username, hashed, role, now, now))
            await self.audit.record(actor, "user.create", f"user:{username}", tx=tx, role=role)
        return uid

    async def set_password(self, username: str, password: str, *, actor: str = "omactl") -> None:
        if len(password) < 8:
            raise Invalid("password too short", "a password has at least 8 characters")
        hashed = await secrets.hash_password(password)
        async with self.db.transaction() as tx:
            row = await tx.fetchone("SELECT id FROM users WHERE username = ?", (username,))
            if row is None:
                raise NotFound("user not found", f"no user named {username!r}")
            await tx.execute("UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ?",
                             (hashed, utcnow(), row["id"]))
            # A changed password ends the user's sessions.
            await tx.execute("DELETE FROM sessions WHERE user_id = ?", (row["id"],))
            await self.audit.record(actor, "user.password", f"user:{username}", tx=tx)
        if username == "admin":
            self.forget_bootstrap_password()

    def forget_bootstrap_password(self) -> None:
        """The first password is no longer the admin's: the file that holds it must not outlive that."""
        if self.bootstrap_file is not None and self.bootstrap_file.exists():
            self.bootstrap_file.unlink(missing_ok=True)
            log.info("removed %s: the bootstrap password was changed", self.bootstrap_file)

    async def list_users(self) -> list[dict[str, Any]]:
        return await self.db.fetchall("SELECT id, username, role, disabled, created_at, updated_at FROM users "
                                      "ORDER BY username")

    async def bootstrap(self, password_file: Path) -> str | None:
        """Create `admin` with a random password the first time omad starts; never again."""
        async with self.db.transaction() as tx:
            if await tx.scalar("SELECT value FROM settings WHERE key = 'bootstrap_admin_created'"):
                return None
            password = secrets.random_password()
            now = utcnow()
            hashed = await secrets.hash_password(password)
            await tx.execute("INSERT INTO users (username, password_hash, role, created_at, updated_at) "
                             "VALUES ('admin', ?, 'admin', ?, ?)", (hashed, now, now))
            await tx.execute("INSERT INTO settings (key, value) VALUES ('bootstrap_admin_created', ?)", (now,))
            await self.audit.record("omad", "user.bootstrap", "user:admin", tx=tx)
            password_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            os.chmod(password_file, 0o600)
        return password

    # -- API tokens --------------------------------------------------------------------------------

    async def create_token(self, name: str, role: str = "operator", *, appliance_id: str | None = None,
                           expires_days: int | None = None, actor: str = "omactl") -> str:
        """Returns the token once; only its digest is kept."""
        if role not in ROLES:
            raise Invalid("invalid role", f"role must be one of {', '.join(ROLES)}")
        token = secrets.new_secret(secrets.TOKEN_PREFIX)
        expires = _iso(datetime.now(timezone.utc) + timedelta(days=expires_days)) if expires_days else None
        async with self.db.transaction() as tx:
            if await tx.scalar("SELECT 1 FROM api_tokens WHERE name = ?", (name,)):
                raise Conflict("token exists", f"an API token named {name!r} already exists")
            await tx.execute("INSERT INTO api_tokens (name, token_hash, role, appliance_id, created_by, created_at,"
                             " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (name, secrets.digest(token), role, appliance_id, actor, utcnow(), expires))
            await self.audit.record(actor, "token.create", f"token:{name}", tx=tx, role=role,
                                    appliance_id=appliance_id)
        return token

    async def revoke_token(self, name: str, *, actor: str = "omactl") -> None:
        async with self.db.transaction() as tx:
            row = await tx.fetchone("SELECT id FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,))
            if row is None:
                raise NotFound("token not found", f"no active API token named {name!r}")
            await tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (utcnow(), row["id"]))
            await tx.execute("DELETE FROM sessions WHERE api_token_id = ?", (row["id"],))
            await self.audit.record(actor, "token.revoke", f"token:{name}", tx=tx)

    async def list_tokens(self) -> list[dict[str, Any]]:
        return await self.db.fetchall("SELECT id, name, role, appliance_id, created_by, created_at, expires_at, "
                                      "revoked_at, last_used_at FROM api_tokens ORDER BY name")

    # -- login and sessions ------------------------------------------------------------------------

    async def login_password(self, username: str, password: str, source: str) -> Session:
        attempt = self.limiter.attempt(source)  # counted before the slow check (see ratelimit)
        row = await self.db.fetchone("SELECT id, password_hash, role, disabled FROM users WHERE username = ?",
                                     (username,))
        try:
            ok = await secrets.verify_password(row["password_hash"] if row else secrets.DUMMY_HASH, password)
        except RateLimited:  # too many logins being checked at once: this one was not judged
            self.limiter.withdraw(source, attempt)
            raise
        if row is None or not ok or row["disabled"]:
            await self._failed(source, f"user:{username}")
        self.limiter.withdraw(source, attempt)
        principal = Principal(username, row["role"], "user")  # type: ignore[index]
        return await self._open_session(principal, source, user_id=row["id"])  # type: ignore[index]

    async def login_token(self, appliance_id: str, token: str, version: str, source: str) -> Session:
        attempt = self.limiter.attempt(source)
        row = await self._token_row(token)
        if row is None or (row["appliance_id"] and row["appliance_id"] != appliance_id):
            await self._failed(source, f"appliance:{appliance_id}")
        self.limiter.withdraw(source, attempt)
        principal = Principal(row["name"], row["role"], "token")  # type: ignore[index]
        return await self._open_session(principal, source, api_token_id=row["id"], version=version)  # type: ignore[index]

    async def _failed(self, source: str, who: str) -> None:
        await self.audit.record(who, "auth.login", who, outcome="denied", source=source)
        raise Unauthorized("invalid credentials", "the credentials were not accepted")

    async def _open_session(self, principal: Principal, source: str, *, user_id: int | None = None,
                            api_token_id: int | None = None, version: str | None = None) -> Session:
        token = secrets.new_secret(secrets.SESSION_PREFIX)
        expires = _iso(datetime.now(timezone.utc) + timedelta(seconds=self.session_ttl))
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM sessions WHERE expires_at < ?", (utcnow(),))
            await tx.execute("INSERT INTO sessions (token_hash, user_id, api_token_id, source, client_version, "
                             "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (secrets.digest(token), user_id, api_token_id, source, version, utcnow(), expires))
            await self.audit.record(principal.name, "auth.login", f"{principal.kind}:{principal.name}", tx=tx,
                                    source=source)
        return Session(token, expires, principal)

    async def logout(self, bearer: str, actor: str) -> None:
        await self.db.execute("DELETE FROM sessions WHERE token_hash = ?", (secrets.digest(bearer),))
        await self.audit.record(actor, "auth.logout", f"user:{actor}")

    async def _token_row(self, token: str) -> dict[str, Any] | None:
        if not token.startswith(secrets.TOKEN_PREFIX):
            return None
        row = await self.db.fetchone("SELECT * FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                                     (secrets.digest(token),))
        if row is None or (row["expires_at"] and row["expires_at"] < utcnow()):
            return None
        return row

    async def authenticate(self, bearer: str) -> Principal | None:
        """A session token or an API token → who it is; None when unknown, expired or revoked."""
        if bearer.startswith(secrets.SESSION_PREFIX):
            row = await self.db.fetchone(
                "SELECT s.expires_at, u.username, u.role AS urole, u.disabled, t.name, t.role AS trole, "
                "t.revoked_at FROM sessions s LEFT JOIN users u ON u.id = s.user_id "
                "LEFT JOIN api_tokens t ON t.id = s.api_token_id WHERE s.token_hash = ?",
                (secrets.digest(bearer),))
            if row is None or row["expires_at"] < utcnow():
                return None
            if row["username"] is not None:
                return None if row["disabled"] else Principal(row["username"], row["urole"], "user")
            return None if row["revoked_at"] else Principal(row["name"], row["trole"], "token")
        row = await self._token_row(bearer)
        if row is None:
            return None
        await self.db.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (utcnow(), row["id"]))
        return Principal(row["name"], row["role"], "token")
