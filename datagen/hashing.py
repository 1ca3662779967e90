"""The one sha256 helper: hash a file, or hash bytes as they stream through a reader or writer.

Shard tars are hashed while they are written (:class:`ThreadedSha256`) and while they are
validated (:class:`HashingReader`); checkpoints and shards at rest go through :func:`file_sha256`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

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


class ThreadedSha256:
    """sha256 of buffers handed over in order, computed on a helper thread (hashlib releases the
    GIL on large buffers) while the caller goes on, e.g. writing the same buffers to a file.

    The buffers are hashed as they are, not copied: they must not change until :meth:`hexdigest`
    (which waits for the thread) returns.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        # one worker runs the updates in the order they were submitted
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: list[Future[None]] = []

    def update(self, buffers: Sequence[bytes | memoryview]) -> None:
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._pool.submit(self._update, buffers))

    def _update(self, buffers: Sequence[bytes | memoryview]) -> None:
        for buf in buffers:
            self._sha.update(buf)

    def close(self) -> None:
        """Wait for the thread and stop it."""
        self._pool.shutdown(wait=True)

    def hexdigest(self) -> str:
        self.close()
        for f in self._pending:
            f.result()  # an update that failed fails the digest
        return self._sha.hexdigest()

    def __enter__(self) -> ThreadedSha256:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
