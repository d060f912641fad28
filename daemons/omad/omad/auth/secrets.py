"""Password hashing (argon2id) and opaque bearer secrets stored only as SHA-256 digests."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

import argon2

_hasher = argon2.PasswordHasher()

SESSION_PREFIX = "omas_"
TOKEN_PREFIX = "omat_"


async def hash_password(password: str) -> str:
    """argon2 is deliberately slow: keep it off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, _hasher.hash, password)


async def verify_password(stored: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHash):
            return False

    return await asyncio.get_running_loop().run_in_executor(None, check)


# A fixed hash to verify against when the user does not exist, so timing does not reveal usernames.
DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """Bearer secrets are random and long: a plain SHA-256 is the right storage form."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def random_password() -> str:
    return secrets.token_urlsafe(18)
