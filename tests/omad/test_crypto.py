"""The secret box: sealing round trips, a sealed value opens only for its purpose, row and key, first-format values
are resealed bound to their row, the key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from oma_common.errors import Conflict, Invalid
from omad.crypto import SecretBox, SecretUnreadable, is_unbound, load_or_create_key

from ..rig import Stack
from .sealing import first_format


def test_seal_and_open(tmp_path: Path) -> None:
    box = SecretBox.from_key_file(tmp_path / "secret.key")
    sealed = box.seal("pa$$ wörd", purpose="test.password", row=7)
    assert sealed.startswith("v2.") and "pa$$" not in sealed
    assert box.open(sealed, purpose="test.password", row=7) == "pa$$ wörd"
    assert box.open(sealed, purpose="test.password", row="7") == "pa$$ wörd"  # the row's key, whatever its type
    assert box.seal("same", purpose="p", row=1) != box.seal("same", purpose="p", row=1)  # a fresh nonce every time


def test_a_sealed_value_opens_only_for_its_purpose_row_and_key(tmp_path: Path) -> None:
    box = SecretBox.from_key_file(tmp_path / "a.key")
    sealed = box.seal("secret", purpose="vmware", row=1)
    with pytest.raises(SecretUnreadable, match="unreadable") as caught:
        box.open(sealed, purpose="vmware", row=2)  # copied into another row
    assert isinstance(caught.value, Conflict) and caught.value.status == 409  # the caller sets it again: not a 500
    assert "another row" in caught.value.details
    with pytest.raises(SecretUnreadable):
        box.open(sealed, purpose="cloudstack", row=1)
    with pytest.raises(SecretUnreadable):
        SecretBox.from_key_file(tmp_path / "b.key").open(sealed, purpose="vmware", row=1)
    with pytest.raises(SecretUnreadable):
        box.open(sealed[:-4] + "AAAA", purpose="vmware", row=1)
    with pytest.raises(SecretUnreadable):
        box.open("plaintext", purpose="vmware", row=1)


def test_a_first_format_value_is_resealed_bound_to_its_row_and_not_opened_as_it_is(tmp_path: Path) -> None:
    box = SecretBox.from_key_file(tmp_path / "secret.key")
    old = first_format(tmp_path / "secret.key", "old pa$$", "vmware")
    assert is_unbound(old)
    with pytest.raises(SecretUnreadable, match="unreadable") as caught:
        box.open(old, purpose="vmware", row=3)
    assert "before secrets were bound" in caught.value.details
    new = box.reseal(old, purpose="vmware", row=3)
    assert new.startswith("v2.") and not is_unbound(new)
    assert box.open(new, purpose="vmware", row=3) == "old pa$$"
    with pytest.raises(SecretUnreadable):
        box.open(new, purpose="vmware", row=4)
    with pytest.raises(SecretUnreadable):
        box.reseal(old, purpose="cloudstack", row=3)


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
