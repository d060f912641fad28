"""What the enrollment and tunnel tests share: a VMA's Ed25519 key (as the VMA signs) and the enrollment steps."""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..rig import Api


@dataclasses.dataclass
class VmaKey:
    """A VMA's key pair, as its enrollment client holds it."""

    private: Ed25519PrivateKey
    name: str = "vma-test"

    @classmethod
    def fresh(cls, name: str = "vma-test") -> VmaKey:
        return cls(Ed25519PrivateKey.generate(), name)

    @property
    def public_line(self) -> str:
        raw = self.private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH).decode()
        return f"{raw} {self.name}@vma"

    def sign(self, challenge: str, *, decoded: bool = True) -> str:
        """The VMA base64-decodes the 64 hex characters before signing; `decoded=False` signs the text."""
        message = base64.b64decode(challenge) if decoded else challenge.encode()
        return base64.b64encode(self.private.sign(message)).decode()

    def write(self, directory: Path) -> Path:
        """The private key in OpenSSH format (0600), for ssh -i."""
        path = directory / f"{self.name}.key"
        pem = self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return path


async def pairing_code(admin: Api, valid_for: int = 600) -> str:
    status, body = await admin.post("/admin/vma/pairing-code", {"generated_by": "test", "valid_for": valid_for})
    assert status == 200, body
    return str(body["pairing_code"])


async def enroll(admin: Api, anon: Api, key: VmaKey, code: str | None = None) -> tuple[int, dict[str, Any]]:
    body = {"pairing_code": code or await pairing_code(admin), "vma_public_key": key.public_line,
            "vma_name": key.name, "vma_version": "3.1.0", "vma_fingerprint": f"hw-{key.name}"}
    status, out = await anon.post("/vma/enroll", body, token="")
    return status, out


async def verified(admin: Api, anon: Api, key: VmaKey) -> str:
    """Enroll and prove possession: the enrollment id, awaiting approval."""
    status, out = await enroll(admin, anon, key)
    assert status == 200, out
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": out["enrollment_id"],
                                                          "signature": key.sign(out["challenge"])}, token="")
    assert status == 200 and body["status"] == "awaiting_approval", body
    return str(out["enrollment_id"])


async def approved(admin: Api, anon: Api, key: VmaKey) -> str:
    eid = await verified(admin, anon, key)
    status, body = await admin.post(f"/admin/vma/approve/{eid}", {"approved_by": "test-admin", "notes": "lab VMA"})
    assert status == 200 and body["status"] == "approved" and body["ssh_user"], body
    return eid
