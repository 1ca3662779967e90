"""The record that flows through the stages: one source item on its way to a layered sample."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What a detection's candidate mask is (``Detection.extra["candidate"]``): an exact colour region, a rough
# region for the segmenter to refine, or a matting model's soft alpha (kept as it is).
EXACT, ROUGH, MATTE = "exact", "rough", "matte"


@dataclass
class Detection:
    """One foreground candidate: a box from grounding, then a mask from segmentation."""

    phrase: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    mask: np.ndarray | None = None  # uint8 (H, W), 255 inside; set by the segment stage
    caption: str = ""  # per-layer caption; set by the caption stage or assemble
    pixels: np.ndarray | None = None  # uint8 (H, W, 3) layer colours when known (true layers)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific numbers for the json


@dataclass
class Item:
    """A source item and everything the stages have learnt about it.

    ``source`` is the descriptor the decode stage reads from (see ``datagen.sources``);
    ``rejected`` is ``{"stage", "reason"}`` once any stage gives up on the item. Rejected
    items keep flowing to the writer so it can account for every item of a shard.
    """

    key: str
    shard: int
    index: int  # position within the shard
    uri: str
    source: dict[str, Any]
    sha256: str = ""
    image: np.ndarray | None = None  # uint8 (H, W, 3), normalised
    alpha: np.ndarray | None = None  # uint8 (H, W): the source's own alpha (None: opaque); image is
    # the source composited over the decode stage's alpha_background
    caption: str = ""
    source_meta: dict[str, Any] = field(default_factory=dict)
    phrases: list[str] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    background: np.ndarray | None = None  # uint8 (H, W, 3), foregrounds removed
    background_caption: str = ""
    members: dict[str, bytes] | None = None  # the encoded sample (suffix -> bytes) once assembled
    num_layers: int = 0
    quality: dict[str, Any] = field(default_factory=dict)  # numbers for the sample json
    truth: Any = None  # generated scenes: the true layers (datagen.scenes.Scene)
    rejected: dict[str, str] | None = None

    def reject(self, stage: str, reason: str) -> None:
        """Mark the item rejected by ``stage`` (the first rejection wins) and drop its pixels."""
        if self.rejected is None:
            self.rejected = {"stage": stage, "reason": reason[:500]}
        self.image = self.background = self.members = self.truth = self.alpha = None
        self.detections = []

    @property
    def ok(self) -> bool:
        return self.rejected is None

    def to_bytes(self) -> bytes:
        """Pickle readable under numpy 1 and 2 (a stage may run in another environment, e.g. LAVIS)."""
        buf = io.BytesIO()
        _NeutralPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(self)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> Item:
        return _CompatUnpickler(io.BytesIO(data)).load()


# -- records across numpy 1 and 2 ------------------------------------------------------------------
# numpy 2 pickles name numpy._core.*, which numpy 1 lacks; numpy 1 pickles name numpy.core.*, which
# numpy 2 loads only with a DeprecationWarning. Arrays and scalars therefore travel through the
# version-neutral rebuild functions below, and reading maps module names back where needed.


def _rebuild_array(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def _rebuild_scalar(data: bytes, dtype: str) -> np.generic:
    return np.frombuffer(data, dtype=np.dtype(dtype))[0]


class _CompatUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy._core") and int(np.__version__.split(".")[0]) < 2:
            module = "numpy.core" + module[len("numpy._core"):]
        return super().find_class(module, name)


class _NeutralPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and obj.dtype.kind not in "OV":
            return _rebuild_array, (np.ascontiguousarray(obj).tobytes(), obj.dtype.str, obj.shape)
        if isinstance(obj, np.generic) and obj.dtype.kind not in "OV":
            return _rebuild_scalar, (obj.tobytes(), obj.dtype.str)
        return NotImplemented
