"""The stage interface shared by every backend, classical or model-based.

A stage loads what it needs once in ``__init__`` and maps a batch in ``__call__``: exactly the
shape Ray Data's ``map_batches`` wants from a callable class, so each stage runs as an actor
pool. The batch is ``{"record": array of pickled Item}``; a backend only writes
:meth:`Stage.process`, which sees the items not yet rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

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
    """Pin torch, OpenCV and BLAS to the actor's CPU share (oversubscription is the usual slowdown)."""
    threads = max(1, int(num_cpus))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import cv2

    cv2.setNumThreads(threads)
    try:
        import torch
    except ImportError:
        return threads
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # random or tiny weights make denormals, 10x slower on CPU
    return threads


def file_sha256(path: str | Path, _cache: dict[tuple[str, float, int], str] = {}) -> str:  # noqa: B006
    """sha256 of a file, cached by (path, mtime, size) since checkpoints are large."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


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
        """Process the accepted items as one batch; if the batch fails, retry one by one so a
        single bad item is rejected with its reason and the rest go on."""
        live = [it for it in items if it.ok]
        if not live:
            return items
        try:
            self.process(live)
        except Exception:  # noqa: BLE001 - isolate the culprit below
            for it in live:
                if not it.ok:
                    continue
                try:
                    self.process([it])
                except Exception as err:  # noqa: BLE001 - recorded, never fatal
                    it.reject(self.stage, _describe(err))
        return items


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
