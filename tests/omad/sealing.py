"""Sealed values in the first format (before secrets were bound to their row), to test their upgrade."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def first_format(key_file: Path, plaintext: str, purpose: str) -> str:
    """`plaintext` sealed as omad did before row binding: ``v1.``, the purpose alone as associated data."""
    key = base64.urlsafe_b64decode(key_file.read_text().strip())
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), purpose.encode("utf-8"))
    return "v1." + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")
