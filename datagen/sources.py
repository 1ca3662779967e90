"""Sources: list raw items in a stable order on the driver; read one item's bytes in a worker.

A source item is a small JSON-able descriptor, so listing is cheap and reading happens in the
decode stage's actors. Shard s takes items [s*P, (s+1)*P) of the listing.

Folders and tars may be local paths or fsspec URLs (``s3://``, ``gs://``, ``hf://``,
``file://``, ``memory://``). A tar is read once when it is listed, header by header, and each
item's descriptor records where its members' bytes are (offset and size in the uncompressed
stream), so reading an item costs O(1) whatever the tar's size. A worker keeps the tars it
reads open; a compressed tar is then decompressed once per pass over it (items arrive in order).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

from datagen.config import ConfigError, SourceConfig
from datagen.format import group_tar_members

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
        yield from _iter_folder(cfg.path or ".")
    elif cfg.kind == "tars":
        yield from _iter_tars(cfg.path or "")
    else:
        raise ValueError(f"unknown source kind {cfg.kind!r}")


def list_items(cfg: SourceConfig, limit: int) -> list[SourceRef]:
    """The first ``limit`` items of a source."""
    return list(islice(iter_source(cfg), limit))


# Where a listing stands: [tar number in the pattern, items listed from that tar] for a tar
# source, [items listed] for the others. JSON-able: a shard manifest records where its items end.
Position = list[int]


def iter_source_from(cfg: SourceConfig, start: Position | None = None) -> Iterator[tuple[SourceRef, Position]]:
    """The items of a source in order from ``start`` (a position this function gave; None: the
    beginning), each with the position just after it. From a tar position, the tars before it
    are not opened and only the headers of the skipped items of its tar are read."""
    if cfg.kind != "tars":
        n = start[0] if start else 0
        for ref in islice(iter_source(cfg), n, None):
            n += 1
            yield ref, [n]
        return
    urls = tar_urls(cfg.path or "")
    first, skip = start or (0, 0)
    for t in range(first, len(urls)):
        refs = _iter_tar(urls[t])
        ref, m = next(refs, None), 0
        while ref is not None:
            following, m = next(refs, None), m + 1
            if t > first or m > skip:
                # after a tar's last item the position is the next tar's start: a listing that
                # resumes there does not open this tar again
                yield ref, [t, m] if following is not None else [t + 1, 0]
            ref = following


def tar_urls(pattern: str) -> list[str]:
    """The tars of a brace pattern, refused when two share a name (``a/00000.tar`` and
    ``b/00000.tar``): item keys derive from the tar's name, so their items would collide."""
    urls = expand_braces(pattern)
    seen: dict[str, str] = {}
    for url in urls:
        stem = _tar_stem(url)
        if stem in seen:
            raise ConfigError(f"tars {seen[stem]} and {url} share the name {stem!r}: their items' keys would collide")
        seen[stem] = url
    return urls


def _tar_stem(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]


DEMO_PHOTO_EVERY = 8  # demo: a photo, then 7 scenes, until the photos run out


def _iter_demo(cfg: SourceConfig) -> Iterator[SourceRef]:
    # Photos spread through the stream, not all first: every shard of `make dataset SHARDS=2`
    # holds photos and scenes, and no batch waits on eight matting-model runs.
    scenes = _iter_scenes("scene", "scene")
    if cfg.photos:
        for name, (filename, caption) in DEMO_PHOTOS.items():
            yield SourceRef(f"photo-{name}", f"skimage:{filename}",
                            {"kind": "skimage", "file": filename, "caption": caption})
            yield from islice(scenes, DEMO_PHOTO_EVERY - 1)
    yield from scenes


def _iter_scenes(prefix: str, kind: str) -> Iterator[SourceRef]:
    seed = 0
    while True:
        yield SourceRef(f"{prefix}-{seed:06d}", f"{kind}:{seed}", {"kind": kind, "seed": seed})
        seed += 1


def is_url(path: str) -> bool:
    """An fsspec URL (``proto://...``) rather than a local path."""
    return "://" in path


def _iter_folder(root: Path | str) -> Iterator[SourceRef]:
    if is_url(str(root)):
        yield from _iter_folder_url(str(root))
        return
    root = Path(root)
    root_real = root.resolve()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in filenames)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    rels = [p.relative_to(root).as_posix() for p in files]
    for rel, desc in _folder_items(rels):
        desc["root"] = str(root_real)
        for k in ("path", "txt", "json"):
            if k in desc:
                desc[k] = str(root / desc[k])
        yield SourceRef(slug_key(rel), f"file:{rel}", desc)


def _iter_folder_url(root: str) -> Iterator[SourceRef]:
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    rels = sorted(p[len(base):].lstrip("/") for p in fs.find(base))
    for rel, desc in _folder_items(rels):
        for k in ("path", "txt", "json"):
            if k in desc:
                desc[k] = fs.unstrip_protocol(f"{base}/{desc[k]}")
        yield SourceRef(slug_key(rel), f"file:{rel}", desc)


def _folder_items(rels: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Items of a folder from its sorted relative file names: images with their sidecars
    (``x.txt``, ``x.json``), and every other file (rejected when read, for the record)."""
    def stem(rel: str) -> str:
        return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel

    def suffix(rel: str) -> str:
        base = rel.rsplit("/", 1)[-1]
        return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""

    stems_with_image = {stem(r) for r in rels if suffix(r) in IMAGE_EXTENSIONS}
    rel_set = set(rels)
    for rel in rels:
        if suffix(rel) in (".txt", ".json") and stem(rel) in stems_with_image:
            continue  # a sidecar, read with its image
        desc: dict[str, Any] = {"kind": "file", "path": rel}
        for side in ("txt", "json"):
            sidecar = f"{stem(rel)}.{side}"
            if suffix(rel) in IMAGE_EXTENSIONS and sidecar in rel_set:
                desc[side] = sidecar
        yield rel, desc


def expand_braces(pattern: str) -> list[str]:
    """``raw/{00000..00009}.tar`` -> the listed paths (webdataset's brace notation)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _iter_tars(pattern: str) -> Iterator[SourceRef]:
    for url in tar_urls(pattern):
        yield from _iter_tar(url)


def _iter_tar(url: str) -> Iterator[SourceRef]:
    """The items of one tar, listed lazily (a listing that needs only the first shard reads only
    its headers): each member's header is read and its data skipped (a seek), never read."""
    stem = _tar_stem(url)
    listed = 0
    try:
        with open_uncompressed(url) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for group in group_tar_members((m, (m.name, m.offset_data, m.size)) for m in tf):
                if not group.key:
                    continue  # a directory entry or a file without a suffix: not an item
                members = {suffix.lower(): list(where) for suffix, where in group.members.items()}
                listed += 1
                if any("not contiguous" in p for p in group.problems):
                    # the key reappears later in the tar: recorded once more, rejected, under its own key
                    first = min(offset for _, offset, _ in members.values())
                    yield SourceRef(slug_key(f"{stem}/{group.key}@{first}"), f"tar:{url}#{group.key}",
                                    {"kind": "tar-error", "tar": url, "reason": "; ".join(group.problems)})
                    continue
                yield SourceRef(slug_key(f"{stem}/{group.key}"), f"tar:{url}#{group.key}",
                                {"kind": "tar", "tar": url, "members": members})
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        # The tar (or its rest) is unreadable: one rejected pseudo-item records it.
        where = f" after {listed} items" if listed else ""
        yield SourceRef(slug_key(f"{Path(url).name}{where}"), f"tar:{url}",
                        {"kind": "tar-error", "tar": url, "reason": f"{type(err).__name__}{where}: {err}"})


def tar_item(url: str, key: str) -> dict[str, Any] | None:
    """The read descriptor of sample ``key`` of the tar at ``url`` (as listed for ``read_item``),
    or None when the tar has no such item; used to look at one item again, e.g. a rejected one."""
    uri = f"tar:{url}#{key}"
    return next((ref.descriptor for ref in _iter_tar(url) if ref.uri == uri), None)


_MAGIC: tuple[tuple[bytes, Any], ...] = (
    (b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


def open_uncompressed(url: str) -> IO[bytes]:
    """A seekable reader of the tar's uncompressed bytes (a local path or an fsspec URL).

    Compressed tars (gzip, bzip2, xz, by magic number) are decompressed as they are read; seeking
    forward decompresses up to the offset, so reading members in order streams the file once.
    """
    if is_url(url):
        import fsspec

        raw = fsspec.open(url, "rb").open()
    else:
        raw = open(url, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        head = raw.read(6)
        raw.seek(0)
    except Exception:
        raw.close()
        raise
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return opener(fileobj=raw) if opener is gzip.GzipFile else opener(raw)
    return raw


class _OpenTars:
    """The tars a worker reads from, kept open (least recently used closed beyond ``size``)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.files: OrderedDict[str, IO[bytes]] = OrderedDict()

    def read(self, url: str, offset: int, size: int) -> bytes:
        f = self.files.pop(url, None)
        if f is None:
            f = open_uncompressed(url)
        self.files[url] = f
        while len(self.files) > self.size:
            self.files.popitem(last=False)[1].close()
        try:
            f.seek(offset)
            data = f.read(size)
        except Exception:
            self.files.pop(url, None)
            f.close()
            raise
        if len(data) != size:
            raise SourceReadError(f"tar {url}: member at {offset} is truncated ({len(data)} of {size} bytes)")
        return data


_TARS = _OpenTars()


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
        path = desc["path"]
        if not is_url(path) and Path(path).is_symlink() and not _inside(Path(path), Path(desc["root"])):
            raise SourceReadError("symlink leaves the source folder")
        suffix = Path(path).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise SourceReadError(f"not an image file type ({suffix or 'no extension'})")
        raw = RawItem(data=_read_file(path))
        if "txt" in desc:
            raw.caption = _read_file(desc["txt"])
        if "json" in desc:
            raw.meta = _read_file(desc["json"])
        return raw
    if kind == "tar-error":
        raise SourceReadError(f"unreadable tar: {desc['reason']}")
    if kind == "tar":
        members = desc["members"]
        unsafe = [name for name, _, _ in members.values() if not _safe_member(name)]
        if unsafe:
            raise SourceReadError(f"unsafe member path {unsafe[0]!r}")
        image = next((members[s] for s in TAR_IMAGE_SUFFIXES if s in members), None)
        if image is None:
            raise SourceReadError(f"no image member (has {sorted(members)})")

        wanted = {"image": image, **{s: members[s] for s in ("txt", "json") if s in members}}
        # in tar order, so that a compressed tar is only ever read forwards
        data = {k: _TARS.read(desc["tar"], w[1], w[2]) for k, w in sorted(wanted.items(), key=lambda kw: kw[1][1])}
        return RawItem(data=data["image"], caption=data.get("txt"), meta=data.get("json"))
    raise SourceReadError(f"unknown source descriptor kind {kind!r}")


def _read_file(path: str) -> bytes:
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    return Path(path).read_bytes()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False
