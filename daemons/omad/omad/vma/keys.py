"""OpenSSH Ed25519 public keys: parsing "ssh-ed25519 AAAA… comment", fingerprints, and signature checks."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from oma_common.errors import Invalid

KEY_TYPE = "ssh-ed25519"


@dataclasses.dataclass(frozen=True)
class SshKey:
    blob: bytes  # the wire form: string "ssh-ed25519", string <32 bytes>
    raw: bytes  # the 32-byte public key
    comment: str

    @property
    def openssh(self) -> str:
        """The authorized_keys form, without the comment (which the enrolling side chose)."""
        return f"{KEY_TYPE} {base64.b64encode(self.blob).decode()}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)


def fingerprint(blob: bytes) -> str:
    """SHA256:<unpadded base64>, as ssh-keygen -l and sshd's %f print it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _strings(blob: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise ValueError("truncated length")
        (n,) = struct.unpack(">I", blob[i:i + 4])
        if i + 4 + n > len(blob):
            raise ValueError("truncated string")
        out.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return out


def parse(text: str) -> SshKey:
    """An `ssh-ed25519 AAAA… [comment]` line; any other key type, or a malformed key, is refused."""
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise Invalid("malformed public key", "vma_public_key must read 'ssh-ed25519 <base64> [comment]'")
    if parts[0] != KEY_TYPE:
        raise Invalid("unsupported key type", f"only {KEY_TYPE} keys are accepted, not {parts[0][:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        fields = _strings(blob)
    except (binascii.Error, ValueError) as e:
        raise Invalid("malformed public key", f"the key's base64 part does not decode: {e}") from e
    if len(fields) != 2 or fields[0] != KEY_TYPE.encode() or len(fields[1]) != 32:
        raise Invalid("malformed public key", "the key's encoded type is not ssh-ed25519 or its length is not 32 bytes")
    return SshKey(blob, fields[1], parts[2].strip() if len(parts) > 2 else "")


def host_key_fingerprint(text: str) -> str:
    """The fingerprint of a host public key file's content (any key type); '' when it cannot be read."""
    parts = text.split()
    try:
        return fingerprint(base64.b64decode(parts[1], validate=True)) if len(parts) >= 2 else ""
    except binascii.Error:
        return ""


def _signed_messages(challenge: str) -> list[bytes]:
    """The VMA signs the challenge after base64-decoding it (64 hex characters are valid base64); older clients
    sign the string itself. Both are accepted (CONTRACTS.md, "VMA enrollment")."""
    messages = [challenge.encode()]
    try:
        messages.insert(0, base64.b64decode(challenge, validate=True))
    except binascii.Error:
        pass
    return messages


def verify(key: SshKey, challenge: str, signature_b64: str) -> bool:
    """Whether `signature_b64` (base64 of a 64-byte Ed25519 signature) signs `challenge` with `key`."""
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except binascii.Error:
        return False
    if len(signature) != 64:
        return False
    public = Ed25519PublicKey.from_public_bytes(key.raw)
    for message in _signed_messages(challenge):
        try:
            public.verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False
