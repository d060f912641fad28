"""The secret box: sealing round trips, a sealed value opens only for its purpose and key, the key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from oma_common.errors import Internal, Invalid
from omad.crypto import SecretBox, load_or_create_key

from ..rig import Stack


def test_seal_and_open(tmp_path: Path) -> None:
    box = SecretBox.from_key_file(tmp_path / "secret.key")
    sealed = box.seal("pa$$ wörd", purpose="test.password")
    assert sealed.startswith("v1.") and "pa$$" not in sealed
    assert box.open(sealed, purpose="test.password") == "pa$$ wörd"
    assert box.seal("same", purpose="p") != box.seal("same", purpose="p")  # a fresh nonce every time


def test_a_sealed_value_opens_only_for_its_purpose_and_key(tmp_path: Path) -> None:
    box = SecretBox.from_key_file(tmp_path / "a.key")
    sealed = box.seal("secret", purpose="vmware")
    with pytest.raises(Internal, match="unreadable"):
        box.open(sealed, purpose="cloudstack")
    with pytest.raises(Internal):
        SecretBox.from_key_file(tmp_path / "b.key").open(sealed, purpose="vmware")
    with pytest.raises(Internal):
        box.open(sealed[:-4] + "AAAA", purpose="vmware")
    with pytest.raises(Internal):
        box.open("plaintext", purpose="vmware")


def test_key_file_is_created_0600_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secret.key"
    first = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary left behind
    os.chmod(path, 0o644)
    assert load_or_create_key(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened again


def test_a_broken_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_text("too short\n")
    with pytest.raises(Invalid, match="bad secret key"):
        load_or_create_key(path)


def test_omad_creates_its_key_on_first_start(stack: Stack) -> None:
    key = stack.state / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    stack.stop("omad")
    stack.start("omad")
    assert key.read_bytes() == before
