"""Users, API tokens and sessions: login, bearer authentication, and the bootstrap administrator."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from oma_common.errors import Invalid, NotFound, RateLimited, Unauthorized

from ..audit import Audit
from ..store import users as store
from ..store.db import STORAGE_ERRORS, Database, utcnow
from ..store.users import ApiToken, Role
from . import secrets
from .ratelimit import FailureLimiter

log = logging.getLogger(__name__)

ROLES = tuple(r.value for r in Role)


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
            uid = await store.add_user(tx, username, hashed, Role(role), utcnow())
            await self.audit.record(actor, "user.create", f"user:{username}", tx=tx, role=role)
        return uid

    async def set_password(self, username: str, password: str, *, actor: str = "omactl") -> None:
        if len(password) < 8:
            raise Invalid("password too short", "a password has at least 8 characters")
        hashed = await secrets.hash_password(password)
        async with self.db.transaction() as tx:
            user = await store.user_by_name(tx, username)
            if user is None:
                raise NotFound("user not found", f"no user named {username!r}")
            await store.set_password(tx, user.id, hashed, utcnow())
            await self.audit.record(actor, "user.password", f"user:{username}", tx=tx)
        if username == "admin":
            self.forget_bootstrap_password()

    def forget_bootstrap_password(self) -> None:
        """The first password is no longer the admin's: the file that holds it must not outlive that."""
        if self.bootstrap_file is not None and self.bootstrap_file.exists():
            self.bootstrap_file.unlink(missing_ok=True)
            log.info("removed %s: the bootstrap password was changed", self.bootstrap_file)

    async def list_users(self) -> list[dict[str, Any]]:
        return [{"id": u.id, "username": u.username, "role": u.role, "disabled": int(u.disabled),
                 "created_at": u.created_at, "updated_at": u.updated_at} for u in await store.users(self.db)]

    async def bootstrap(self, password_file: Path) -> str | None:
        """Create `admin` with a random password the first time omad starts; never again."""
        async with self.db.transaction() as tx:
            if await store.setting(tx, _BOOTSTRAPPED):
                return None
            password = secrets.random_password()
            now = utcnow()
            hashed = await secrets.hash_password(password)
            await store.add_user(tx, "admin", hashed, Role.ADMIN, now)
            await store.put_setting(tx, _BOOTSTRAPPED, now)
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
            await store.add_token(tx, name, secrets.digest(token), Role(role), appliance_id=appliance_id,
                                  created_by=actor, now=utcnow(), expires_at=expires)
            await self.audit.record(actor, "token.create", f"token:{name}", tx=tx, role=role,
                                    appliance_id=appliance_id)
        return token

    async def revoke_token(self, name: str, *, actor: str = "omactl") -> None:
        async with self.db.transaction() as tx:
            found = await store.active_token_named(tx, name)
            if found is None:
                raise NotFound("token not found", f"no active API token named {name!r}")
            await store.revoke_token(tx, found.id, utcnow())
            await self.audit.record(actor, "token.revoke", f"token:{name}", tx=tx)

    async def list_tokens(self) -> list[dict[str, Any]]:
        return [{f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "token_hash"}
                for t in await store.tokens(self.db)]

    # -- login and sessions ------------------------------------------------------------------------

    async def login_password(self, username: str, password: str, source: str) -> Session:
        attempt = self.limiter.attempt(source)  # counted before the slow check (see ratelimit)
        user = await store.user_by_name(self.db, username)
        try:
            ok = await secrets.verify_password(user.password_hash if user else secrets.DUMMY_HASH, password)
        except RateLimited:  # too many logins being checked at once: this one was not judged
            self.limiter.withdraw(source, attempt)
            raise
        if user is None or not ok or user.disabled:
            raise await self._failed(source, f"user:{username}")
        self.limiter.withdraw(source, attempt)
        return await self._open_session(Principal(username, user.role, "user"), source, user_id=user.id)

    async def login_token(self, appliance_id: str, token: str, version: str, source: str) -> Session:
        attempt = self.limiter.attempt(source)
        found = await self._token(token)
        if found is None or (found.appliance_id and found.appliance_id != appliance_id):
            raise await self._failed(source, f"appliance:{appliance_id}")
        self.limiter.withdraw(source, attempt)
        return await self._open_session(Principal(found.name, found.role, "token"), source, api_token_id=found.id,
                                        version=version)

    async def _failed(self, source: str, who: str) -> Unauthorized:
        """Audit a refused login (the limiter counted it already); returns the error to raise."""
        await self.audit.record(who, "auth.login", who, outcome="denied", source=source)
        return Unauthorized("invalid credentials", "the credentials were not accepted")

    async def _open_session(self, principal: Principal, source: str, *, user_id: int | None = None,
                            api_token_id: int | None = None, version: str | None = None) -> Session:
        token = secrets.new_secret(secrets.SESSION_PREFIX)
        expires = _iso(datetime.now(timezone.utc) + timedelta(seconds=self.session_ttl))
        async with self.db.transaction() as tx:
            await store.open_session(tx, secrets.digest(token), user_id=user_id, api_token_id=api_token_id,
                                     source=source, client_version=version, now=utcnow(), expires_at=expires)
            await self.audit.record(principal.name, "auth.login", f"{principal.kind}:{principal.name}", tx=tx,
                                    source=source)
        return Session(token, expires, principal)

    async def logout(self, bearer: str, actor: str) -> None:
        async with self.db.transaction() as tx:
            await store.close_session(tx, secrets.digest(bearer))
        await self.audit.record(actor, "auth.logout", f"user:{actor}")

    async def _token(self, token: str) -> ApiToken | None:
        if not token.startswith(secrets.TOKEN_PREFIX):
            return None
        found = await store.active_token_by_hash(self.db, secrets.digest(token))
        if found is None or (found.expires_at and found.expires_at < utcnow()):
            return None
        return found

    async def authenticate(self, bearer: str) -> Principal | None:
        """A session token or an API token → who it is; None when unknown, expired or revoked."""
        if bearer.startswith(secrets.SESSION_PREFIX):
            owner = await store.session_owner(self.db, secrets.digest(bearer))
            if owner is None or owner.expires_at < utcnow():
                return None
            if owner.username is not None and owner.user_role is not None:
                return None if owner.user_disabled else Principal(owner.username, owner.user_role, "user")
            if owner.token_name is None or owner.token_role is None:
                return None
            return None if owner.token_revoked_at else Principal(owner.token_name, owner.token_role, "token")
        found = await self._token(bearer)
        if found is None:
            return None
        try:
            async with self.db.transaction() as tx:
                await store.token_used(tx, found.id, utcnow())
        except STORAGE_ERRORS as e:  # bookkeeping: a read must not fail because this cannot be written
            log.warning("API token %s: its last use not recorded: %s", found.name, e.message)
        return Principal(found.name, found.role, "token")


_BOOTSTRAPPED = "bootstrap_admin_created"  # settings key: the first start's administrator was made
