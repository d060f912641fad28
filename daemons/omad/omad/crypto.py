"""Secrets at rest: AES-256-GCM sealing with a key file only omad can read, created on first start.

Any feature that must keep a secret it will need again (vCenter passwords, CloudStack secret keys, CIFS
passwords) seals it here and stores only the sealed text. `purpose` names what the secret is for (table and
column) and `row` the row that holds it; both are bound into the ciphertext as associated data, so a sealed
value copied into another column, table or row does not open there.

Sealed text is ``v2.<base64url(nonce || ciphertext || tag)>`` (associated data ``purpose NUL row``). The
first format, ``v1.``, bound only the purpose: omad reseals such values once at start-up (`reseal`), and
`open` refuses them, so an old value copied into a row is not accepted either.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oma_common.errors import Conflict, Invalid

from .store.db import Database, Tx

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v2."  # bound to purpose and row
UNBOUND_PREFIX = "v1."  # bound to the purpose only: resealed at start-up


class SecretUnreadable(Conflict):
    """A stored secret that does not open: sealed for another row or purpose, tampered with, or sealed by
    another key. The caller fixes it by setting the secret again."""

    code = "secret_unreadable"


def _bound(purpose: str, row: str | int) -> bytes:
    return f"{purpose}\0{row}".encode("utf-8")


def is_unbound(sealed: str) -> bool:
    """Sealed in the first format (not bound to its row): to be resealed with `reseal`."""
    return sealed.startswith(UNBOUND_PREFIX)


class SecretBox:
    """Seal and open short secrets with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secret key has {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        """Read the key file, creating it (mode 0600, never wider) when it does not exist yet."""
        return cls(load_or_create_key(path))

    def seal(self, plaintext: str, *, purpose: str, row: str | int) -> str:
        """`plaintext` sealed for the column `purpose` of the row `row` (its primary key)."""
        return PREFIX + self._encrypt(plaintext, _bound(purpose, row))

    def open(self, sealed: str, *, purpose: str, row: str | int) -> str:
        """The plaintext; SecretUnreadable when the text was not sealed by this key for this purpose and row."""
        if not sealed.startswith(PREFIX):
            why = ("was sealed before secrets were bound to their row and was not resealed at start-up"
                   if is_unbound(sealed) else "has an unknown format")
            raise SecretUnreadable("stored secret unreadable", f"the {purpose} secret of row {row} {why}; "
                                   "set it again", purpose=purpose, row=str(row))
        return self._decrypt(sealed[len(PREFIX):], _bound(purpose, row), purpose, row)

    def reseal(self, sealed: str, *, purpose: str, row: str | int) -> str:
        """A first-format value (bound to the purpose only) sealed again, bound to its row."""
        if not is_unbound(sealed):
            raise ValueError("only a first-format (v1.) value is resealed")
        plain = self._decrypt(sealed[len(UNBOUND_PREFIX):], purpose.encode("utf-8"), purpose, row)
        return self.seal(plain, purpose=purpose, row=row)

    def _encrypt(self, plaintext: str, associated: bytes) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), associated)
        return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def _decrypt(self, text: str, associated: bytes, purpose: str, row: str | int) -> str:
        try:
            raw = base64.urlsafe_b64decode(text.encode("ascii"))
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated)
        except (InvalidTag, ValueError) as e:
            # Another row's value copied here, a tampered row, or a database restored without its key file.
            raise SecretUnreadable("stored secret unreadable",
                                   f"the {purpose} secret of row {row} does not open with this appliance's key: "
                                   "it was sealed for another row, altered, or the database was restored "
                                   "without its secret.key; set it again", purpose=purpose, row=str(row)) from e
        return plain.decode("utf-8")


Row = TypeVar("Row", str, int)


async def reseal_all(db: Database, box: SecretBox, purpose: str,
                     read: Callable[[Tx], Awaitable[Sequence[tuple[Row, str]]]],
                     write: Callable[[Tx, Row, str], Awaitable[None]]) -> int:
    """Reseal, bound to its row, every first-format value of one column (`read` gives (row id, sealed), `write`
    stores one); in one transaction, so a crash leaves every value in one format or the other. How many."""
    count = 0
    async with db.transaction() as tx:
        for row, sealed in await read(tx):
            if not is_unbound(sealed):
                continue
            try:
                resealed = box.reseal(sealed, purpose=purpose, row=row)
            except SecretUnreadable as e:  # left as it is: its uses say why it fails, setting it again fixes it
                log.error("cannot reseal the %s secret of row %s: %s", purpose, row, e.details)
                continue
            await write(tx, row, resealed)
            count += 1
    if count:
        log.warning("resealed %d %s secret(s) bound to their rows", count, purpose)
    return count


def load_or_create_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _create_key(path)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Invalid("bad secret key file", f"{path} is not a regular file")
        if st.st_mode & 0o077:
            # Readable by others means it may have leaked; tighten it and say so rather than refuse to start.
            log.warning("secret key %s had mode %o; setting 0600", path, stat.S_IMODE(st.st_mode))
            os.fchmod(f.fileno(), 0o600)
        text = f.read().strip()
    try:
        key = base64.urlsafe_b64decode(text)
    except ValueError as e:
        raise Invalid("bad secret key file", f"{path} does not hold a base64 key") from e
    if len(key) != KEY_BYTES:
        raise Invalid("bad secret key file", f"{path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key


def _create_key(path: Path) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL and mode 0600 from the first byte; rename makes the key appear whole or not at all.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(base64.urlsafe_b64encode(key) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(partial, path)  # fails if another process created the key meanwhile: use theirs
        except FileExistsError:
            return load_or_create_key(path)
    finally:
        partial.unlink(missing_ok=True)
    log.warning("created the secret key %s (back it up with the database: sealed secrets need it)", path)
    return key
