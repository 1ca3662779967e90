"""The one sha256 helper: hash a file, or hash bytes as they stream through a reader or writer.

Shard tars are hashed while they are written (:class:`HashingWriter`) and while they are
validated (:class:`HashingReader`); checkpoints and shards at rest go through :func:`file_sha256`.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import IO, Any

BLOCK = 1 << 20


class HashingReader:
    """A read-only file wrapper that hashes (sha256) and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever is left of the file."""
        while self.read(BLOCK):
            pass

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts what passes through it, so a writer
    knows its file's sha256 without reading the file back."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.sha = f, hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data: Any) -> int:
        self.sha.update(data)
        n = self._f.write(data)
        self.bytes += len(data)
        return n if n is not None else len(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], cache: bool = True) -> str:
    """sha256 hex digest of a file, read in blocks.

    The digest is remembered for this process by (resolved path, inode, mtime, size): model
    checkpoints are large and named in every manifest. ``cache=False`` always reads the file
    (``--verify``, validation).
    """
    p = Path(path)
    key = None
    if cache:
        st = p.stat()
        key = (str(p.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
        if key in _CACHE:
            return _CACHE[key]
    with open(p, "rb") as raw:
        reader = HashingReader(raw)
        reader.drain()
    digest = reader.hexdigest()
    if key is not None:
        _CACHE[key] = digest
    return digest
