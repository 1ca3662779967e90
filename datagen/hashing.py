"""The one sha256 helper: hash a file, or hash bytes as they stream through a reader or writer.

Shard tars are hashed while they are written (:class:`HashingWriter`) and while they are
validated (:class:`HashingReader`); checkpoints and shards at rest go through :func:`file_sha256`.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
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
    knows its file's sha256 without reading the file back.

    Writes are gathered into blocks of ``block`` bytes; each block is hashed on a helper thread
    (hashlib releases the GIL) while the caller goes on producing the next one, so hashing costs
    little wall time next to writing. Call :meth:`close` (or leave the ``with`` block) before
    :meth:`hexdigest`.
    """

    def __init__(self, f: IO[bytes], block: int = BLOCK) -> None:
        super().__init__()
        self._f, self._block, self.sha = f, block, hashlib.sha256()
        self._buf: list[bytes] = []
        self._buffered = 0
        self._pending: Future[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data: Any) -> int:
        n = len(data)
        self._buf.append(bytes(data))
        self._buffered += n
        self.bytes += n
        if self._buffered >= self._block:
            self._flush_block()
        return n

    def _flush_block(self) -> None:
        chunk, self._buf, self._buffered = b"".join(self._buf), [], 0
        if self._pending is not None:
            self._pending.result()  # blocks are hashed in order
        self._pending = self._pool.submit(self.sha.update, chunk)
        view = memoryview(chunk)
        while view:  # a raw file may write less than asked (a disk filling up): the next write raises
            n = self._f.write(view)
            view = view[n if n is not None else len(view):]

    def flush(self) -> None:
        if self._buf:
            self._flush_block()
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self._f.flush()

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush()
            finally:
                self._pool.shutdown()
                super().close()

    def hexdigest(self) -> str:
        if self._buf or self._pending is not None:
            raise RuntimeError("HashingWriter: flush() before hexdigest()")
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
