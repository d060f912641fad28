"""Secrets at rest: AES-256-GCM sealing with a key file only omad can read, created on first start.

Any feature that must keep a secret it will need again (vCenter passwords, CloudStack secret keys, CIFS
passwords) seals it here and stores only the sealed text. `purpose` names what the secret is for; it is
bound into the ciphertext as associated data, so a sealed value copied into another column or table does
not open there.

Sealed text is ``v1.<base64url(nonce || ciphertext || tag)>``; the version prefix leaves room for key
rotation without guessing.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oma_common.errors import Internal, Invalid

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v1."


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

    def seal(self, plaintext: str, *, purpose: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), purpose.encode("utf-8"))
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, *, purpose: str) -> str:
        """The plaintext; Internal when the text was not sealed by this key for this purpose."""
        if not sealed.startswith(PREFIX):
            raise Internal("stored secret unreadable", f"a stored {purpose} secret has an unknown format")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(PREFIX):].encode("ascii"))
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], purpose.encode("utf-8"))
        except (InvalidTag, ValueError) as e:
            # A restored database without its key file, or a tampered row: nothing the caller can fix here.
            raise Internal("stored secret unreadable",
                           f"a stored {purpose} secret does not open with this appliance's key "
                           "(database restored without its secret.key?)") from e
        return plain.decode("utf-8")


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
