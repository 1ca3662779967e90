"""Sources: list raw items in a stable order on the driver; read one item's bytes in a worker.

A source item is a small JSON-able descriptor, so listing is cheap and reading happens in the
decode stage's actors. Shard s takes items [s*P, (s+1)*P) of the listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from datagen.config import SourceConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")

# scikit-image's bundled photos (files inside the wheel) with captions written for them.
DEMO_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.png", "an astronaut in a white suit in front of a flag"),
    "chelsea": ("chelsea.png", "a cat lying on a brown floor"),
    "coffee": ("coffee.png", "a cup of coffee on a saucer on a red table"),
    "rocket": ("rocket.jpg", "a rocket on a launch pad under a blue sky"),
    "motorcycle": ("motorcycle_left.png", "a motorcycle in a garage"),
    "horse": ("horse.png", "a black horse on a white background"),
    "coins": ("coins.png", "coins on a grey table"),
    "hubble": ("hubble_deep_field.jpg", "galaxies in the night sky"),
}


@dataclass(frozen=True)
class SourceRef:
    """One item of a source: a unique key, a URI for humans, and what the reader needs."""

    key: str
    uri: str
    descriptor: dict[str, Any]


def slug_key(text: str) -> str:
    """A format-valid key derived from a source path: readable slug + hash for uniqueness."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[-60:] or "item"
    return f"{slug}-{hashlib.sha1(text.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def iter_source(cfg: SourceConfig) -> Iterator[SourceRef]:
    """All items of a source in its stable order."""
    if cfg.kind == "demo":
        yield from _iter_demo(cfg)
    elif cfg.kind == "synthetic-gt":
        yield from _iter_scenes("gt-scene", "scene-gt")
    elif cfg.kind == "folder":
        yield from _iter_folder(Path(cfg.path or "."))
    elif cfg.kind == "tars":
        yield from _iter_tars(cfg.path or "")
    else:
        raise ValueError(f"unknown source kind {cfg.kind!r}")


def list_items(cfg: SourceConfig, limit: int) -> list[SourceRef]:
    """The first ``limit`` items of a source."""
    return list(islice(iter_source(cfg), limit))


def _iter_demo(cfg: SourceConfig) -> Iterator[SourceRef]:
    if cfg.photos:
        for name, (filename, caption) in DEMO_PHOTOS.items():
            yield SourceRef(f"photo-{name}", f"skimage:{filename}",
                            {"kind": "skimage", "file": filename, "caption": caption})
    yield from _iter_scenes("scene", "scene")


def _iter_scenes(prefix: str, kind: str) -> Iterator[SourceRef]:
    seed = 0
    while True:
        yield SourceRef(f"{prefix}-{seed:06d}", f"{kind}:{seed}", {"kind": kind, "seed": seed})
        seed += 1


def _iter_folder(root: Path) -> Iterator[SourceRef]:
    root_real = root.resolve()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in filenames)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    stems_with_image = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    file_set = set(files)
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in (".txt", ".json") and path.with_suffix("") in stems_with_image:
            continue  # a sidecar, read with its image
        desc: dict[str, Any] = {"kind": "file", "path": str(path), "root": str(root_real)}
        stem = path.with_suffix("")
        for side in ("txt", "json"):
            sidecar = stem.with_suffix(f".{side}")
            if path.suffix.lower() in IMAGE_EXTENSIONS and sidecar in file_set:
                desc[side] = str(sidecar)
        yield SourceRef(slug_key(rel), f"file:{rel}", desc)


def expand_braces(pattern: str) -> list[str]:
    """``raw/{00000..00009}.tar`` -> the listed paths (webdataset's brace notation)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _iter_tars(pattern: str) -> Iterator[SourceRef]:
    for tar_path in expand_braces(pattern):
        tar_name = Path(tar_path).name
        try:
            with tarfile.open(tar_path) as tf:
                members = [m for m in tf.getmembers()]
        except (OSError, tarfile.TarError) as err:
            # The whole tar is unreadable: one rejected pseudo-item records it.
            yield SourceRef(slug_key(tar_name), f"tar:{tar_path}",
                            {"kind": "tar-error", "tar": tar_path, "reason": f"{type(err).__name__}: {err}"})
            continue
        groups: dict[str, dict[str, str]] = {}
        for m in members:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            prefix = m.name[: len(m.name) - len(base)]
            key, suffix = base.split(".", 1)
            groups.setdefault(prefix + key, {})[suffix.lower()] = m.name
        for key, by_suffix in groups.items():
            yield SourceRef(slug_key(f"{Path(tar_path).stem}/{key}"), f"tar:{tar_path}#{key}",
                            {"kind": "tar", "tar": tar_path, "members": by_suffix})


@dataclass
class RawItem:
    """What the decode stage gets from a source item."""

    data: bytes | None = None  # encoded image bytes
    array: Any = None  # or an already-decoded uint8 array (generated scenes)
    caption: bytes | str | None = None
    meta: bytes | dict[str, Any] | None = None
    truth: Any = None  # synthetic scenes: the true layers (datagen.scenes.Scene)


# Keys under which source metadata (img2dataset's KEY.json, LAION/CC parquet columns carried into it,
# a folder's sidecar json) states an image's origin, compared case-insensitively, first match wins.
PROVENANCE_KEYS: dict[str, tuple[str, ...]] = {
    "url": ("url", "image_url", "source_url", "original_url"),
    "licence": ("licence", "license", "license_name", "licence_name", "license_url", "rights"),
    "caption": ("caption", "text", "alt", "alt_text"),
}


def provenance(meta: Any) -> dict[str, str]:
    """The sample's provenance from its source's metadata document (the sidecar json as read):
    ``{"url", "licence", "caption", "metadata"}``, each "" when the metadata does not say.
    ``metadata`` is the whole document as JSON text, so its free-form fields travel with the
    sample without giving columnar readers a different JSON shape per sample."""
    out = {name: "" for name in PROVENANCE_KEYS}
    if not isinstance(meta, dict) or not meta:
        return {**out, "metadata": ""}
    lowered = {str(k).lower(): v for k, v in meta.items()}
    for name, keys in PROVENANCE_KEYS.items():
        value = next((lowered[k] for k in keys if isinstance(lowered.get(k), str) and lowered[k].strip()), "")
        out[name] = value.strip()
    out["metadata"] = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
    return out


class SourceReadError(Exception):
    """An item that cannot be read at all (recorded as a decode rejection)."""


def _safe_member(name: str) -> bool:
    parts = Path(name).parts
    return not (name.startswith("/") or ".." in parts or name.startswith("\\"))


def read_item(desc: dict[str, Any], image_size: int) -> RawItem:
    """Read one item's raw bytes and sidecars; raises SourceReadError with a reason."""
    kind = desc["kind"]
    if kind == "skimage":
        import skimage

        path = Path(skimage.__file__).parent / "data" / desc["file"]
        return RawItem(data=path.read_bytes(), caption=desc["caption"])
    if kind in ("scene", "scene-gt"):
        from datagen.scenes import make_scene

        scene = make_scene(int(desc["seed"]), size=image_size)
        return RawItem(array=scene.image, caption=scene.caption, truth=scene)
    if kind == "file":
        path = Path(desc["path"])
        if path.is_symlink() and not _inside(path, Path(desc["root"])):
            raise SourceReadError("symlink leaves the source folder")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise SourceReadError(f"not an image file type ({path.suffix or 'no extension'})")
        raw = RawItem(data=path.read_bytes())
        if "txt" in desc:
            raw.caption = Path(desc["txt"]).read_bytes()
        if "json" in desc:
            raw.meta = Path(desc["json"]).read_bytes()
        return raw
    if kind == "tar-error":
        raise SourceReadError(f"unreadable tar: {desc['reason']}")
    if kind == "tar":
        members = desc["members"]
        unsafe = [n for n in members.values() if not _safe_member(n)]
        if unsafe:
            raise SourceReadError(f"unsafe member path {unsafe[0]!r}")
        image_name = next((members[s] for s in TAR_IMAGE_SUFFIXES if s in members), None)
        if image_name is None:
            raise SourceReadError(f"no image member (has {sorted(members)})")
        with tarfile.open(desc["tar"]) as tf:
            def read(name: str) -> bytes:
                f = tf.extractfile(name)
                if f is None:
                    raise SourceReadError(f"member {name!r} is not a file")
                return f.read()

            return RawItem(data=read(image_name),
                           caption=read(members["txt"]) if "txt" in members else None,
                           meta=read(members["json"]) if "json" in members else None)
    raise SourceReadError(f"unknown source descriptor kind {kind!r}")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False
