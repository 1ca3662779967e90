"""The shard writer frames tars itself: its bytes must be exactly what ``tarfile`` writes for the
same members, readable by tarfile, webdataset and datagen.format, and its faults must surface."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from datagen import writer
from datagen.format import iter_tar_samples
from datagen.hashing import ThreadedSha256
from datagen.writer import write_tar

Samples = list[tuple[str, dict[str, bytes]]]


def tarfile_bytes(samples: Samples) -> bytes:
    """What ``tarfile`` writes for these members (the writer's metadata: mode 0644, mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), writer.TAR_MTIME, 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def odd_samples(seed: int = 0) -> Samples:
    """Members of awkward sizes (empty, one byte, exact blocks and records, larger than a writev
    batch and than the writeback step) and names (long enough for the ustar prefix, non-ASCII)."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 511, 512, 513, 10240, 10239, 3 * 512, 70_001]
    samples: Samples = [(f"k{i:03d}", {"png": rng.bytes(n), "txt": f"caption {i}".encode()})
                        for i, n in enumerate(sizes)]
    samples.append(("big", {"image.png": rng.bytes(writer.WRITE_BYTES + 12_345), "json": b"{}"}))
    samples.append(("d" * 80 + "/" + "long-key-" + "x" * 60, {"fg.0.png": b"\x89PNG", "mask.0.png": b""}))
    samples.append(("café-ünïcode", {"txt": "une tasse de café".encode()}))
    return samples


def test_bytes_identical_to_tarfile_and_hash_and_size_right(tmp_path: Path):
    samples = odd_samples()
    expected = tarfile_bytes(samples)
    sha256, size = write_tar(tmp_path / "a.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == expected
    assert (sha256, size) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert size % tarfile.RECORDSIZE == 0


def test_many_small_members_and_writeback_steps(tmp_path: Path, monkeypatch):
    """More buffers than one writev takes, and several writeback requests within one tar."""
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 64 * 1024)
    rng = np.random.default_rng(1)
    samples = [(f"s{i:05d}", {"png": rng.bytes(int(rng.integers(0, 3000))), "txt": b"x" * (i % 7)})
               for i in range(600)]
    expected = tarfile_bytes(samples)
    assert write_tar(tmp_path / "a.tar", samples) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert (tmp_path / "a.tar").read_bytes() == expected


def test_empty_tar_is_tarfiles_empty_tar(tmp_path: Path):
    expected = tarfile_bytes([])
    assert write_tar(tmp_path / "a.tar", []) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert (tmp_path / "a.tar").read_bytes() == expected


def test_readers_read_back_every_member(tmp_path: Path):
    samples = [s for s in odd_samples(2) if "/" not in s[0]]  # webdataset keys have no folder
    path = tmp_path / "a.tar"
    write_tar(path, samples)
    with tarfile.open(path) as tf:
        read = {m.name: tf.extractfile(m).read() for m in tf}
    assert read == {f"{k}.{s}": d for k, members in samples for s, d in members.items()}
    got = [(g.key, g.members, g.problems) for g in iter_tar_samples(path)]
    assert got == [(k, members, []) for k, members in samples]

    import webdataset as wds

    rows = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in rows] == [k for k, _ in samples]
    for row, (_, members) in zip(rows, samples, strict=True):
        assert {s: row[s] for s in members} == members


def test_short_writes_continue_where_they_stopped(tmp_path: Path, monkeypatch):
    """A write that takes only part of its buffers (a filling disk, a signal) is resumed at the
    right byte, within a buffer or between two."""
    real = os.writev
    calls = []

    def short_writev(fd: int, buffers: list) -> int:
        calls.append(len(buffers))
        views = [memoryview(b).cast("B") for b in buffers]
        budget = 1000 + 337 * (len(calls) % 5)  # a few hundred bytes to a few blocks each time
        taken = []
        for v in views:
            taken.append(v[:budget])
            budget -= len(taken[-1])
            if budget <= 0:
                break
        return real(fd, taken)

    monkeypatch.setattr(os, "writev", short_writev)
    samples = odd_samples(3)[:6]
    expected = tarfile_bytes(samples)
    assert write_tar(tmp_path / "a.tar", samples) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert (tmp_path / "a.tar").read_bytes() == expected
    assert len(calls) > 10  # the write was indeed cut many times


def test_full_disk_raises_and_stops_the_hash_thread(tmp_path: Path, monkeypatch):
    real, written = os.writev, []

    def filling(fd: int, buffers: list) -> int:
        if sum(written) > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real(fd, buffers))
        return written[-1]

    monkeypatch.setattr(os, "writev", filling)
    before = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        write_tar(tmp_path / "a.tar", odd_samples())
    assert threading.active_count() == before  # the hashing thread ended with the write


def test_a_write_that_makes_no_progress_is_an_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(os, "writev", lambda fd, buffers: 0)
    with pytest.raises(OSError, match="no progress"):
        write_tar(tmp_path / "a.tar", odd_samples()[:2])


def test_a_truncated_file_is_detected(tmp_path: Path, monkeypatch):
    """Something cuts the file while it is written: the size check names both sizes."""
    path, real_fsync = tmp_path / "a.tar", os.fsync

    def truncating_fsync(fd: int) -> None:
        os.truncate(path, 1024)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", truncating_fsync)
    with pytest.raises(OSError, match=rf"a\.tar holds 1024 bytes, {len(tarfile_bytes(odd_samples()))} were written"):
        write_tar(path, odd_samples())


def test_the_tar_is_flushed_to_disk(tmp_path: Path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    _, size = write_tar(tmp_path / "a.tar", odd_samples())
    assert synced == [size]  # once, after the last byte


def test_a_name_tarfile_refuses_is_refused(tmp_path: Path):
    """ustar holds a 155-character folder and a 100-character name: tarfile's own error."""
    with pytest.raises(ValueError, match="name is too long"):
        write_tar(tmp_path / "a.tar", [("k" * 120, {"png": b"x"})])


def test_threaded_sha256_is_sha256_of_the_buffers_in_order():
    rng = np.random.default_rng(4)
    chunks = [rng.bytes(int(n)) for n in rng.integers(0, 300_000, 40)]
    with ThreadedSha256() as sha:
        for i in range(0, len(chunks), 3):
            sha.update([memoryview(c) for c in chunks[i:i + 3]])
    assert sha.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
