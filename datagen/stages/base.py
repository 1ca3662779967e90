"""The stage interface shared by every backend, classical or model-based.

A stage loads what it needs once in ``__init__`` and maps a batch in ``__call__``: exactly the
shape Ray Data's ``map_batches`` wants from a callable class, so each stage runs as an actor
pool. The batch is ``{"record": array of pickled Item}``; a backend only writes
:meth:`Stage.process`, which sees the items not yet rejected.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datagen.hashing import file_sha256  # noqa: F401 - the model backends' checkpoint digests
from datagen.item import Item


@dataclass(frozen=True)
class StageContext:
    """What every stage may know about the run, besides its own params."""

    image_size: int = 256
    max_layers: int = 3
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class NoParams:
    """For backends without settings."""


def limit_threads(num_cpus: float) -> int:
    """Pin torch, OpenCV and BLAS to the actor's CPU share (oversubscription is the usual slowdown).

    torch is configured only when the backend has imported it (call again after loading a
    model); a classical stage never imports it. A torch or numba imported later reads the
    environment.
    """
    threads = max(1, int(num_cpus))
    # NUMBA_NUM_THREADS: pymatting's parallel kernels (soft alpha) would otherwise use every core
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    import cv2

    cv2.setNumThreads(threads)
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before: its pool size is fixed, the threads it uses are not
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch = sys.modules.get("torch")
    if torch is None:
        return threads
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # random or tiny weights make denormals, 10x slower on CPU
    return threads


def batches(items: Iterable[Any], size: int, first_one: bool = False) -> Iterator[list[Any]]:
    """``items`` in lists of ``size``; with ``first_one`` the first list holds one item (the first
    result then waits on one item, not on a batch)."""
    it = iter(items)
    if first_one and (head := list(islice(it, 1))):
        yield head
    while chunk := list(islice(it, size)):
        yield chunk


class Stage:
    """Base class of every backend. Subclasses set ``stage``, ``name``, ``Params`` and ``process``."""

    stage: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    version: ClassVar[str] = "1"

    def __init__(self, params: Any = None, context: StageContext | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.context = context or StageContext()
        limit_threads(self.context.num_cpus)

    # -- what a backend implements ---------------------------------------------------------
    def process(self, items: list[Item]) -> None:
        """Update ``items`` in place (all accepted); call ``item.reject`` to give one up."""
        raise NotImplementedError

    @classmethod
    def check(cls, params: Any) -> None:
        """Fail before any work starts if the params name missing files (override for models)."""

    @classmethod
    def identity(cls, params: Any) -> dict[str, Any]:
        """The manifest's record of this backend: backend, model, checkpoint, version."""
        return {"backend": cls.name, "model": None, "checkpoint": None, "version": cls.version}

    # -- the Ray Data adapter --------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item.from_bytes(b) for b in batch["record"]]
        self.run_items(items)
        return {"record": np.array([it.to_bytes() for it in items], dtype=object)}

    def run_items(self, items: list[Item]) -> list[Item]:
        """Process the accepted items as one batch.

        An item's own problem fails only that item: if the batch raises one, the items are
        retried one by one and the culprit is rejected with its reason. A system fault (see
        :func:`is_system_fault`) is never a rejection: out of memory halves the batch, anything
        else is retried with backoff, and then :class:`StageFault` stops the shard.
        """
        live = [it for it in items if it.ok]
        if live:
            self._run_batch(live)
        return items

    def _run_batch(self, live: list[Item]) -> None:
        try:
            self._retrying(live)
        except _ItemProblem:
            for it in live:  # find the culprit: each item alone
                if it.ok:
                    try:
                        self._retrying([it])
                    except _ItemProblem as problem:
                        it.reject(self.stage, _describe(problem.__cause__ or problem))

    def _retrying(self, items: list[Item]) -> None:
        """``process(items)``, a system fault retried (out of memory: in halves); an item's own
        problem is raised as :class:`_ItemProblem`, a lasting system fault as StageFault."""
        for attempt in range(FAULT_RETRIES + 1):
            try:
                self.process(items)
                return
            except Exception as err:  # noqa: BLE001 - classified here
                if not is_system_fault(err):
                    raise _ItemProblem() from err
                free_accelerator_memory()
                if is_out_of_memory(err) and len(items) > 1:
                    half = len(items) // 2
                    for part in (items[:half], items[half:]):
                        self._run_batch([it for it in part if it.ok])
                    return
                if attempt == FAULT_RETRIES:
                    raise StageFault(f"{_shards(items)}: stage {self.stage} ({self.name}) failed "
                                     f"{FAULT_RETRIES + 1} times: {_describe(err)}") from err
                time.sleep(FAULT_BACKOFF_S * 2 ** attempt)


class _ItemProblem(Exception):
    """Raised from an item's own problem (the cause), to be recorded as its rejection."""


FAULT_RETRIES = 2  # a system fault is retried this many times (backoff doubling) before the shard fails
FAULT_BACKOFF_S = 0.5
# errnos that describe the item's own file (gone, a folder, a link loop, unreadable), not the system
ITEM_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EACCES, errno.EPERM,
               errno.ENAMETOOLONG}
_DEVICE_ERROR = re.compile(r"out of memory|CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error|"
                           r"device-side assert|HIP error|XPU error|MPS backend out of memory")


class StageFault(RuntimeError):
    """A fault that is not the items' own (out of memory, device, I/O): the shard fails, loudly."""


def is_out_of_memory(err: BaseException) -> bool:
    """Accelerator or host out of memory (torch.cuda.OutOfMemoryError and friends, MemoryError)."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and "out of memory" in str(err)))


def is_system_fault(err: BaseException) -> bool:
    """Whether ``err`` is the system's problem rather than the item's: memory, accelerator,
    I/O (an OSError with an errno other than the item's own file), network, a stage fault."""
    if isinstance(err, StageFault) or is_out_of_memory(err):
        return True
    if isinstance(err, RuntimeError) and _DEVICE_ERROR.search(str(err)):
        return True
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return isinstance(err, OSError) and err.errno is not None and err.errno not in ITEM_ERRNOS


def free_accelerator_memory() -> None:
    """Give cached GPU memory back before a retry (only when the backend uses torch on CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shards(items: list[Item]) -> str:
    shards = sorted({it.shard for it in items})
    return "shard " + ", ".join(f"{s:06d}" for s in shards)


@dataclass
class SoftAlphaParams:
    """Soft alpha at object edges, shared by the segment backends' params (``datagen.alpha``)."""

    soft_alpha: bool = True  # matte a band around each mask's edge: soft alpha and decontaminated
    # colours where the image's edges are soft (False: binary masks, as format 1)
    alpha_band: int = 4  # px either side of each mask's boundary that the matting re-estimates
    # (measured on blurred scenes: 3 and 4 px beat 6, where the solver starts to fail)
    alpha_colours: str = "nearest"  # edge colours: "nearest" opaque pixel's, or "ml" (pymatting's
    # multilevel estimate: follows texture, ~3x the soft path's CPU time, BENCHMARKS.md)

    def __post_init__(self) -> None:
        if self.alpha_band < 1:
            raise ValueError(f"alpha_band must be >= 1 px, got {self.alpha_band}")
        if self.alpha_colours not in ("nearest", "ml"):
            raise ValueError(f"alpha_colours {self.alpha_colours!r}: choose nearest or ml")


class Segmenter(Stage):
    """A segment backend: its ``process`` sets binary ``det.mask`` values; then, with the
    ``soft_alpha`` param, every mask's edge is matted here (one place for every backend), and
    a source with its own alpha (``Item.alpha``) bounds every layer."""

    stage = "segment"

    def run_items(self, items: list[Item]) -> list[Item]:
        super().run_items(items)
        if getattr(self.params, "soft_alpha", False):
            from datagen.alpha import soften_detections

            for it in items:
                if not it.ok or it.image is None:
                    continue
                try:
                    soften_detections(it.image, it.detections, self.params.alpha_band,
                                      self.params.alpha_colours)
                except Exception as err:  # noqa: BLE001 - recorded, never fatal
                    it.reject(self.stage, "soft alpha: " + _describe(err))
        for it in items:  # a source with its own alpha: layers never reach past it
            if it.ok and it.alpha is not None and it.image is not None:
                from datagen.alpha import apply_source_alpha

                apply_source_alpha(it.image, it.alpha, it.detections, getattr(self.params, "alpha_band", 4),
                                   it.quality.get("alpha_background", (255, 255, 255)))
                it.detections = [d for d in it.detections if d.mask is None or d.mask.any()]
                if not it.detections:
                    it.reject(self.stage, "every mask lies where the source image is transparent")
        return items


def _describe(err: BaseException) -> str:
    frame = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" ({Path(frame[0].filename).name}:{frame[0].lineno})" if frame else ""
    return f"{type(err).__name__}: {err}{where}"


def params_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build a Params dataclass from a YAML mapping; an unknown key is an error naming it."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {sorted(fields)})")
    return cls(**values)


class ImageCaptioner(Stage):
    """A caption backend: ``caption_images`` captions a batch of images; ``process`` sets the
    global caption of each item (keeping a source caption when ``params.keep_source_caption``)."""

    stage = "caption"

    def caption_images(self, images: list[np.ndarray]) -> list[str]:
        raise NotImplementedError

    def process(self, items: list[Item]) -> None:
        todo = [it for it in items if not (getattr(self.params, "keep_source_caption", False) and it.caption)]
        for it in todo:
            if it.image is None:
                raise ValueError(f"{it.key}: no decoded image")
        for it, caption in zip(todo, self.caption_images([it.image for it in todo]), strict=True):
            if caption:
                it.caption = caption
            else:  # nothing to ground: the later stages would only waste time on it
                it.reject(self.stage, "empty caption")
