"""A zip's central directory kept on disk while the archive streams, so a zip of millions of members does not
grow the daemon's memory.

zipfile.ZipFile keeps a ZipInfo per member (about 550 bytes) in `filelist`, and again in `NameToInfo`,
until close() writes the central directory from `filelist` — which it only appends to, counts and iterates
while writing. `SpilledInfos` is that list backed by an anonymous temporary file (O_TMPFILE: no name, gone
with the descriptor): each ZipInfo's slots are marshalled out on append and rebuilt one at a time on
iteration. `NameToInfo` is only consulted for the duplicate-name warning, which an archive walk (each name
once) does not need.
"""

from __future__ import annotations

import io
import marshal
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

_LENGTH = struct.Struct("<I")
_SLOTS: tuple[str, ...] = zipfile.ZipInfo.__slots__


class SpilledInfos:
    """The list of ZipInfo that zipfile writes its central directory from, held in a temporary file."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="oma-zip-index-", buffering=256 * 1024)
        self._count = 0

    def append(self, info: zipfile.ZipInfo) -> None:
        record = marshal.dumps(tuple(getattr(info, slot, None) for slot in _SLOTS))
        self._file.seek(0, io.SEEK_END)
        self._file.write(_LENGTH.pack(len(record)) + record)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[zipfile.ZipInfo]:
        self._file.seek(0)
        for _ in range(self._count):
            (size,) = _LENGTH.unpack(self._file.read(_LENGTH.size))
            info = zipfile.ZipInfo.__new__(zipfile.ZipInfo)
            for slot, value in zip(_SLOTS, marshal.loads(self._file.read(size)), strict=True):
                setattr(info, slot, value)
            yield info

    def close(self) -> None:
        self._file.close()


class _Forgetful(dict[str, Any]):
    def __setitem__(self, key: str, value: Any) -> None:
        pass


def spill(zf: zipfile.ZipFile) -> SpilledInfos:
    """Make a ZipFile opened for writing (and not written to yet) keep its central directory on disk."""
    infos = SpilledInfos()
    zf.filelist = infos  # type: ignore[assignment]
    zf.NameToInfo = _Forgetful()
    return infos
