"""Password hashing (argon2id) and opaque bearer secrets stored only as SHA-256 digests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2

from oma_common.errors import RateLimited

_hasher = argon2.PasswordHasher()

#: argon2 checks run on their own two threads: each takes ~64 MiB and a CPU for ~100 ms, and a login flood
#: must neither take the memory nor the default executor's threads that backups and copies use.
HASH_WORKERS = 2
#: Logins waiting for a hashing thread beyond this are turned away (429) instead of queueing without bound.
MAX_WAITING = 16
_pool = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="argon2")
_waiting = 0
T = TypeVar("T")

SESSION_PREFIX = "omas_"
TOKEN_PREFIX = "omat_"


async def _hashing(fn: Callable[[], T]) -> T:
    """Run one argon2 operation on the hashing threads; RateLimited when too many are already waiting."""
    global _waiting
    if _waiting >= MAX_WAITING:
        raise RateLimited("too many logins at once", f"{_waiting} logins are being checked; try again shortly",
                          retry_after=1)
    _waiting += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_pool, fn)
    finally:
        _waiting -= 1


async def hash_password(password: str) -> str:
    """argon2 is deliberately slow: keep it off the event loop."""
    return await _hashing(lambda: _hasher.hash(password))


async def verify_password(stored: str, password: str) -> bool:
    def check() -> bool:
        try:
            return bool(_hasher.verify(stored, password))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHash):
            return False

    return await _hashing(check)


def _unmatchable_hash() -> str:
    """A well-formed hash with the hasher's own parameters, a random salt and a random tag: no password
    matches it, and checking one against it costs what checking a user's hash costs. Made without hashing,
    so starting omad does not pay one argon2 run (~0.2 s of CPU on four threads)."""

    def b64(n: int) -> str:
        return base64.b64encode(secrets.token_bytes(n)).decode().rstrip("=")  # argon2's unpadded base64

    h = _hasher
    return (f"$argon2{h.type.name.lower()}$v={argon2.low_level.ARGON2_VERSION}"
            f"$m={h.memory_cost},t={h.time_cost},p={h.parallelism}${b64(h.salt_len)}${b64(h.hash_len)}")


# The hash to verify against when the user does not exist, so timing does not reveal usernames.
DUMMY_HASH = _unmatchable_hash()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """Bearer secrets are random and long: a plain SHA-256 is the right storage form."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def random_password() -> str:
    return secrets.token_urlsafe(18)
