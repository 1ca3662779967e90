"""Faults that must not become data loss: each one fails the shard loudly (no tar, no manifest,
a message naming shard and cause), and a rerun completes the dataset with every key once."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datagen.config import PipelineConfig
from datagen.item import Item
from datagen.registry import register
from datagen.runner import PipelineError, run
from datagen.stages import base
from datagen.stages.base import Stage, StageFault
from datagen.stages.truth import TruthInpainter
from datagen.writer import read_verified_manifest
from manifests.validate import validate_dataset
from tests.datagen.helpers import ROOT, load_json, small_config


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(base, "FAULT_BACKOFF_S", 0.0)


@dataclass
class FaultParams:
    flag: str = ""  # while this file exists, items of `shard` fail with `error`
    shard: int = 1
    error: str = "eio"  # eio | oom | value


@register
class FaultyInpaint(TruthInpainter):
    """The truth inpainter, failing on demand: a test double for a disk or GPU in trouble."""

    name = "test-faulty"
    Params = FaultParams

    def process(self, items: list[Item]) -> None:
        p: FaultParams = self.params
        if p.flag and Path(p.flag).exists() and any(it.shard == p.shard for it in items):
            if p.error == "eio":
                raise OSError(errno.EIO, "Input/output error", "/dev/fake-disk")
            if p.error == "oom" and len(items) > 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if p.error == "value":
                raise ValueError("this item is broken")
        super().process(items)


def _faulty(out: Path, flag: Path, error: str = "eio", **doc) -> PipelineConfig:
    """The small synthetic-gt config with the faulty inpainter (3 shards of 6)."""
    stages = {s: {"backend": "truth", "num_cpus": 0.25} for s in ("caption", "ground", "segment")}
    stages["inpaint"] = {"backend": "test-faulty", "params": {"flag": str(flag), "error": error}}
    return small_config(out, shards=3, stages=stages, **doc)


def _keys(out: Path) -> list[str]:
    index = load_json(out / "manifest.json")
    keys = []
    for entry in index["shards"]:
        keys += load_json(out / "manifests" / f"{entry['shard']:06d}.json")["keys"]
    return keys


def _assert_complete(out: Path, shards: int, per_shard: int) -> None:
    keys = _keys(out)
    assert keys == [f"gt-scene-{i:06d}" for i in range(shards * per_shard)]  # each key exactly once
    report = validate_dataset(out)
    assert report.ok(), report


def _assert_not_written(out: Path, shard: int) -> None:
    assert not (out / "shards" / f"{shard:06d}.tar").exists()
    assert not (out / "manifests" / f"{shard:06d}.json").exists()
    assert read_verified_manifest(out, shard) is None


# -- in the stage -----------------------------------------------------------------------------


def _items(n: int, shard: int = 1) -> list[Item]:
    return [Item(key=f"k{i}", shard=shard, index=i, uri="", source={}) for i in range(n)]


class _Counting(Stage):
    stage = "inpaint"
    name = "counting"

    def __init__(self, fail) -> None:
        super().__init__()
        self.fail, self.sizes = fail, []

    def process(self, items: list[Item]) -> None:
        self.sizes.append(len(items))
        self.fail(items)
        for it in items:
            it.caption = "done"


def test_system_fault_is_retried_then_fails_the_shard_not_the_items():
    calls = []

    def fail(items):
        calls.append(len(items))
        raise OSError(errno.EIO, "Input/output error")

    stage = _Counting(fail)
    items = _items(4)
    with pytest.raises(StageFault, match=r"shard 000001: stage inpaint \(counting\) failed 3 times: OSError"):
        stage.run_items(items)
    assert calls == [4, 4, 4]  # the whole batch retried, never split into per-item rejections
    assert all(it.ok for it in items)


def test_transient_fault_recovers_and_items_problem_is_a_rejection():
    state = {"n": 0}

    def fail(items):
        state["n"] += 1
        if state["n"] == 1:
            raise ConnectionError("connection reset by peer")
        if any(it.key == "k2" for it in items):
            raise ValueError("k2 has no foreground")

    stage = _Counting(fail)
    items = stage.run_items(_items(4))
    assert [it.ok for it in items] == [True, True, False, True]
    assert items[2].rejected == {"stage": "inpaint", "reason": items[2].rejected["reason"]}
    assert "ValueError: k2 has no foreground" in items[2].rejected["reason"]
    assert all(it.caption == "done" for it in items if it.ok)


def test_out_of_memory_halves_the_batch():
    def fail(items):
        if len(items) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")

    stage = _Counting(fail)
    items = stage.run_items(_items(8))
    assert all(it.ok and it.caption == "done" for it in items)
    assert stage.sizes == [8, 4, 2, 2, 4, 2, 2]


def test_undecodable_image_is_a_rejection_but_an_io_error_is_not():
    from PIL import UnidentifiedImageError

    from datagen.stages.base import is_system_fault

    assert not is_system_fault(UnidentifiedImageError("cannot identify image file"))
    assert not is_system_fault(OSError("image file is truncated"))
    assert not is_system_fault(FileNotFoundError(errno.ENOENT, "No such file"))
    assert not is_system_fault(ValueError("no object"))
    assert is_system_fault(OSError(errno.ENOSPC, "No space left on device"))
    assert is_system_fault(OSError(errno.EIO, "Input/output error"))
    assert is_system_fault(MemoryError())
    assert is_system_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))


# -- through the runner -----------------------------------------------------------------------


def test_io_fault_fails_shard_loudly_and_rerun_completes(tmp_path: Path):
    out, flag = tmp_path / "out", tmp_path / "disk-trouble"
    flag.touch()
    with pytest.raises(PipelineError, match=r"shard 000001: stage inpaint \(test-faulty\) failed 3 times: "
                                            r"OSError: \[Errno 5\] Input/output error"):
        run(_faulty(out, flag), engine="local", progress=False)
    assert read_verified_manifest(out, 0) is not None  # the shard before it is complete
    _assert_not_written(out, 1)
    flag.unlink()  # the disk recovers
    summary = run(_faulty(out, flag), engine="local", progress=False)
    assert summary.shards_skipped == [0] and sorted(summary.shards_written) == [1, 2]
    _assert_complete(out, 3, 6)


def test_out_of_memory_in_a_run_loses_nothing(tmp_path: Path):
    out, flag = tmp_path / "out", tmp_path / "small-gpu"
    flag.touch()
    summary = run(_faulty(out, flag, "oom"), engine="local", progress=False)
    assert sum(summary.rejected.values()) == 0
    _assert_complete(out, 3, 6)


def test_rejection_rate_ceiling_fails_the_shard(tmp_path: Path):
    out, flag = tmp_path / "out", tmp_path / "bad-batch"
    flag.touch()
    with pytest.raises(PipelineError, match=r"shard 000001 not written: 6 of 6 items rejected \(100% > "
                                            r"max_rejection_rate 50%; ValueError"):
        run(_faulty(out, flag, "value"), engine="local", progress=False)
    _assert_not_written(out, 1)
    assert [e["shard"] for e in load_json(out / "manifest.json")["shards"]] == [0, 2]  # the others are written
    flag.unlink()
    run(_faulty(out, flag, "value"), engine="local", progress=False)
    _assert_complete(out, 3, 6)
    # the same rejections under a ceiling of 100% are recorded, not fatal
    out2 = tmp_path / "out2"
    flag.touch()
    run(_faulty(out2, flag, "value", max_rejection_rate=1.0), engine="local", progress=False)
    assert len(load_json(out2 / "manifests" / "000001.json")["rejected"]) == 6


def test_deleted_temporary_file_fails_the_shard(tmp_path: Path, monkeypatch):
    """Someone deletes the shard's temporary tar while it is written: the shard is not marked done."""
    out = tmp_path / "out"
    real_fsync = os.fsync

    def fsync_after_delete(fd: int) -> None:
        for tmp in (out / "shards").glob(".000001.tar.tmp-*"):
            tmp.unlink()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_after_delete)
    with pytest.raises(PipelineError, match=r"shard 000001: writing to .* failed \(filesystem mounted at .*"
                                            r"FileNotFoundError"):
        run(small_config(out, shards=3), engine="local", progress=False)
    _assert_not_written(out, 1)
    monkeypatch.setattr(os, "fsync", real_fsync)
    run(small_config(out, shards=3), engine="local", progress=False)
    _assert_complete(out, 3, 6)


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from datagen.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _datagen(args: list[str], limit: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m datagen ARGS``, under a file-size limit of ``limit`` bytes when given."""
    code = ["-c", _FULL_DISK.format(limit=limit)] if limit else ["-m", "datagen"]
    return subprocess.run([sys.executable, *code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


_RUN = ["run", "--config", "pipelines/synthetic-gt.yaml", "--shards", "3", "--samples-per-shard", "6", "--no-progress"]
_FULL = r"run stopped: shard 0000\d\d: writing to .* failed \(filesystem mounted at .*MB free\): OSError: \[Errno (27|28)\]"


def _check_full_disk_run(proc: subprocess.CompletedProcess, seconds: float, out: Path) -> None:
    assert seconds < 60, f"the run took {seconds:.0f} s to give up"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(_FULL, proc.stderr), proc.stderr[-2000:]
    for tar in (out / "shards").glob("*.tar"):  # whatever is visible is complete
        assert read_verified_manifest(out, int(tar.stem), verify=True) is not None
    assert not list((out / "shards").glob(".*tmp*"))


def test_full_disk_ends_the_run_naming_disk_and_shard(tmp_path: Path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: no shard fits."""
    out = tmp_path / "out"
    args = [*_RUN, "--out", str(out), "--engine", "local"]
    t0 = time.time()
    proc = _datagen(args, limit=60_000, timeout=60)
    _check_full_disk_run(proc, time.time() - t0, out)
    proc = _datagen(args)  # space freed
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_complete(out, 3, 6)


@pytest.mark.slow
def test_full_tmpfs_through_ray_ends_the_run_and_rerun_completes(tmp_path: Path):
    """A real full filesystem (a 400 KB tmpfs, root only) under Ray: ends within a minute, no hang."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs (needs root)")
    try:
        out = mnt / "out"
        args = [*_RUN, "--out", str(out), "--engine", "ray", "--shards", "8", "--samples-per-shard", "16"]
        t0 = time.time()
        proc = _datagen(args, timeout=120)
        _check_full_disk_run(proc, time.time() - t0, out)
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)  # space freed
        proc = _datagen(args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        _assert_complete(out, 8, 16)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only: permissions for a normal user; a read-only bind mount for root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without the right to mount: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_out_fails_before_any_work(tmp_path: Path):
    out = tmp_path / "out"
    run(small_config(out, shards=1), engine="local", progress=False)
    with _read_only(out):
        t0 = time.time()
        with pytest.raises(PipelineError, match=r"output .*out \(filesystem mounted at .*\) is not writable: "
                                                r".*(Read-only file system|Permission denied)"):
            run(small_config(out, shards=3), engine="local", progress=False)
        assert time.time() - t0 < 30
    run(small_config(out, shards=3), engine="local", progress=False)
    _assert_complete(out, 3, 6)


@pytest.mark.slow
def test_sigkill_of_a_stage_actor_loses_nothing(tmp_path: Path):
    """Kill one Ray actor mid-run: Ray restarts it and retries its batch; every key once."""
    import psutil

    out = tmp_path / "out"
    args = [sys.executable, "-m", "datagen", "run", "--config", "pipelines/synthetic-gt.yaml", "--out", str(out),
            "--shards", "4", "--samples-per-shard", "24", "--engine", "ray", "--no-progress"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(proc.pid)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        for child in driver.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "StageGroup" in " ".join(child.cmdline()):
                    victim = child
                    break
        time.sleep(0.2)
    assert victim is not None, "no stage actor found"
    while time.time() < deadline and not (out / "manifests" / "000000.json").exists() and proc.poll() is None:
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    # Either Ray recovered (exit 0) or the run stopped loudly; never a shard marked done that is not.
    assert proc.returncode in (0, 1), err[-2000:]
    for tar in (out / "shards").glob("*.tar"):
        assert read_verified_manifest(out, int(tar.stem), verify=True) is not None
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=300)
    _assert_complete(out, 4, 24)



def test_real_cuda_out_of_memory_halves_the_batch():
    """On a GPU: a batch whose activations do not fit raises torch's own OutOfMemoryError; the
    stage halves it until each part fits and loses no item."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    free, _ = torch.cuda.mem_get_info()
    per_item = int(free * 0.3)  # 2 items fit, 4 do not

    def allocate(items):
        block = torch.empty(per_item * len(items), dtype=torch.uint8, device="cuda")
        del block

    stage = _Counting(allocate)
    items = stage.run_items(_items(8))
    assert all(it.ok and it.caption == "done" for it in items)
    assert stage.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert torch.cuda.memory_allocated() == 0


def test_rejection_reasons_group_by_their_words_not_their_numbers() -> None:
    from datagen.runner import _reason_class

    a = _reason_class("matte: the object fills the frame (97% of the image > 85%)")
    assert a == "matte: the object fills the frame (N% of the image > N%)"
    assert _reason_class("matte: the object fills the frame (91.5% of the image > 85%)") == a
    assert _reason_class("not a readable image: cannot identify image file '/x/123.jpg'") == "not a readable image"
