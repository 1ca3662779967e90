"""`truth` backends: the generated scene's true layers, for the `synthetic-gt` source.

They let the same pipeline (decode -> ... -> assemble -> writer) write clean training data
straight from the scene generator: ground boxes, segment masks, inpaint background and captions
all come from ``item.truth`` (a ``datagen.scenes.Scene``) instead of an algorithm.
"""

from __future__ import annotations

import numpy as np

from datagen.item import Detection, Item
from datagen.registry import register
from datagen.stages.base import Stage


def _scene(item: Item):
    if item.truth is None:
        raise ValueError("the truth backends need a generated scene (source kind synthetic-gt or demo scenes)")
    return item.truth


@register
class TruthCaptioner(Stage):
    """The scene's global caption and, later, its per-layer and background captions."""

    stage = "caption"
    name = "truth"

    def process(self, items: list[Item]) -> None:
        for item in items:
            scene = _scene(item)
            item.caption = scene.caption
            item.background_caption = scene.background_caption


@register
class TruthGrounder(Stage):
    """One detection per true layer: its phrase, its box, score 1, its depth."""

    stage = "ground"
    name = "truth"

    def process(self, items: list[Item]) -> None:
        for item in items:
            scene = _scene(item)
            item.phrases = list(scene.phrases)
            item.detections = []
            for depth, (mask, phrase, caption) in enumerate(zip(scene.masks, scene.phrases, scene.layer_captions)):
                ys, xs = np.nonzero(mask)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                item.detections.append(Detection(phrase=phrase, box=box, score=1.0, caption=caption,
                                                 extra={"depth": depth}))


@register
class TruthSegmenter(Stage):
    """The true full (amodal) mask and colours of each layer."""

    stage = "segment"
    name = "truth"

    def process(self, items: list[Item]) -> None:
        for item in items:
            scene = _scene(item)
            for det in item.detections:
                depth = det.extra["depth"]
                det.mask = scene.masks[depth].copy()
                det.pixels = scene.foregrounds[depth].copy()
                det.extra["extent"] = "amodal"  # the whole shape, hidden parts included


@register
class TruthInpainter(Stage):
    """The true background, as it is under every shape."""

    stage = "inpaint"
    name = "truth"

    def process(self, items: list[Item]) -> None:
        for item in items:
            item.background = _scene(item).background.copy()
