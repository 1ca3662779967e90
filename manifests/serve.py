"""``python -m manifests serve OUT``: a local, read-only web browser for a layered dataset.

Pages (plain HTML/CSS/JS from ``manifests/web``, no build step): a filterable, sortable,
paginated gallery (image with boxes, background, every layer as RGBA over a checkerboard, a live
recomposition with per-layer toggles), the rejections grouped by stage and reason with thumbnails
of the rejected sources, dataset totals and per-shard charts, and a training run
(``--run runs/NAME``: loss curves and sample grids by step).

Samples are read in place through :mod:`manifests.shardindex` (member offsets, cached outside
OUT). Nothing is written to OUT; the server binds to 127.0.0.1 by default and answers only the
routes below, so any other path (``..`` included) is a 404 and a malformed query a 400.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
from PIL import Image

from datagen.format import KEY_PATTERN, read_sample
from manifests.layout import index_path, read_json, scan_dataset
from manifests.shardindex import IndexedSample, ShardIndex, open_index
from manifests.summary import normalize_reason, summarize

WEB_DIR = Path(__file__).with_name("web")
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
PAGES = ("/", "/rejections", "/stats", "/run")  # each serves index.html; app.js renders by path
PER_PAGE, MAX_PER_PAGE = 24, 200
FIRST_SCREEN = 6  # cards a browser window shows before scrolling (more than it needs on a laptop)
GRID = re.compile(r"^(?:step-(\d+)|reference)\.png$")
THUMB_SIZE = 160
THUMB_MAX_PIXELS = 50_000_000  # the decode stage's default bomb limit
PART_CACHE_BYTES = 256 << 20


class HttpError(Exception):
    """An error answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- the one place the browser decodes a sample ----------------------------------------------------


@dataclass
class SampleLayers:
    """A decoded sample as the browser shows it: RGB image and background, RGBA layers (straight
    colour, 8-bit alpha; index 0 back-most) and the json document."""

    key: str
    image: np.ndarray
    background: np.ndarray
    layers: list[np.ndarray]
    meta: dict[str, Any]


def sample_layers(key: str, members: Mapping[str, bytes]) -> SampleLayers:
    """Decode a sample's members (format 1 or 2) into RGBA layers and its json, through the
    format's one reader (raises ValueError on a bad sample)."""
    s = read_sample(members, key=key)
    return SampleLayers(key, s.image, s.background, list(s.rgba()), s.meta)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an RGB or RGBA uint8 array, at zlib level 1: served once per view, so encoding speed
    matters more than size (``datagen.format.encode_png`` writes L/RGB at level 6 for storage)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# -- query parsing ---------------------------------------------------------------------------------


@dataclass
class GalleryQuery:
    """A parsed gallery query (see :func:`parse_gallery_query`)."""

    page: int = 1
    per_page: int = PER_PAGE
    text: str = ""
    layers: frozenset[int] | None = None
    shards: frozenset[int] | None = None
    stages: tuple[tuple[str, str, str | None], ...] = ()  # (stage, backend, version or None)
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()  # (field, min, max)
    sort: str = "position"
    descending: bool = False


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise HttpError(400, f"{name}={value!r} is not an integer") from None
    if not lo <= number <= hi:
        raise HttpError(400, f"{name}={number} is out of range {lo}..{hi}")
    return number


def _float(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise HttpError(400, f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise HttpError(400, f"{name}={value!r} is not a finite number")
    return number


def _int_set(name: str, value: str) -> frozenset[int]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise HttpError(400, f"{name} is empty")
    return frozenset(_int(name, p, 0, 10**9) for p in parts)


def parse_gallery_query(query: str, fields: set[str]) -> GalleryQuery:
    """Parse ``page, per_page, q, layers=1,2, shard=0,3, stage=STAGE:BACKEND[:VERSION] (repeatable),
    min.FIELD, max.FIELD, sort=FIELD|position|key, order=asc|desc``; ``fields`` are the numeric
    fields that may be filtered and sorted on. Anything else is a 400."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=100)
    except ValueError as err:
        raise HttpError(400, f"malformed query string: {err}") from None
    q = GalleryQuery()
    stages: list[tuple[str, str, str | None]] = []
    ranges: dict[str, list[float | None]] = {}
    for name, value in pairs:
        if name == "page":
            q.page = _int(name, value, 1, 10**9)
        elif name == "per_page":
            q.per_page = _int(name, value, 1, MAX_PER_PAGE)
        elif name == "q":
            if len(value) > 200:
                raise HttpError(400, "q is longer than 200 characters")
            q.text = value.strip().lower()
        elif name == "layers":
            q.layers = _int_set(name, value)
        elif name == "shard":
            q.shards = _int_set(name, value)
        elif name == "stage":
            parts = value.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]):
                raise HttpError(400, f"stage={value!r} is not STAGE:BACKEND[:VERSION]")
            stages.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
        elif name.startswith(("min.", "max.")):
            field_name = name[4:]
            if field_name not in fields:
                raise HttpError(400, f"unknown numeric field {field_name!r} in {name}")
            if value == "":
                continue  # an empty form input: no bound
            ranges.setdefault(field_name, [None, None])[0 if name.startswith("min.") else 1] = \
                _float(name, value)
        elif name == "sort":
            if value not in fields and value not in ("position", "key"):
                raise HttpError(400, f"cannot sort by {value!r}")
            q.sort = value
        elif name == "order":
            if value not in ("asc", "desc"):
                raise HttpError(400, f"order={value!r} is not asc or desc")
            q.descending = value == "desc"
        else:
            raise HttpError(400, f"unknown parameter {name!r}")
    q.stages = tuple(stages)
    q.ranges = tuple((f, lo, hi) for f, (lo, hi) in ranges.items())
    return q


# -- the dataset behind the pages ------------------------------------------------------------------


class PartCache:
    """A byte-bounded LRU of encoded PNGs (the samples' sprites)."""

    def __init__(self, capacity: int = PART_CACHE_BYTES) -> None:
        self.capacity, self.size = capacity, 0
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self.size += len(data)
            while self.size > self.capacity and self._items:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)


class Browser:
    """What the HTTP handler serves: the dataset's index, manifests and an optional run folder."""

    def __init__(self, out: str | Path, run: str | Path | None = None, cache_dir: Path | None = None) -> None:
        self.out = Path(out)
        if not (self.out / "shards").is_dir() and not (self.out / "manifests").is_dir():
            raise FileNotFoundError(f"{self.out} has no shards/ or manifests/ folder: not a dataset")
        self.run = Path(run) if run is not None else None
        if self.run is not None and not self.run.is_dir():
            raise FileNotFoundError(f"run folder {self.run} does not exist")
        self.index: ShardIndex = open_index(self.out, cache_dir)
        self.parts = PartCache()
        self._manifests: dict[int, tuple[int, dict[str, Any]]] = {}
        self._decode_locks = [threading.Lock() for _ in range(64)]
        self._refreshed = time.monotonic()
        self._refresh_lock = threading.Lock()
        self._thumbs: dict[tuple[int, int], dict[str, Any]] = {}
        self._facts: tuple[list[IndexedSample], dict[int, int], list[str]] | None = None
        # Decodes a gallery page's samples as soon as the page is asked for, before the browser's
        # image requests arrive, then the next page's (PIL releases the GIL while it decodes and
        # compresses).
        # One worker: the request threads decode what the browser asks for first in parallel with it.
        self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm")
        self._pending: list[Future[None]] = []

    # dataset state
    def refresh(self, min_interval: float = 1.0) -> None:
        """Pick up shards written or rewritten since the last look (at most once a ``min_interval``)."""
        with self._refresh_lock:
            if time.monotonic() - self._refreshed < min_interval:
                return
            self._refreshed = time.monotonic()
        self.index.refresh()

    def manifests(self) -> dict[int, dict[str, Any]]:
        """Every readable shard manifest (re-read when its file changes)."""
        out: dict[int, dict[str, Any]] = {}
        for shard, path in sorted(scan_dataset(self.out).manifests.items()):
            try:
                stamp = path.stat().st_mtime_ns
                cached = self._manifests.get(shard)
                if cached is None or cached[0] != stamp:
                    doc = read_json(path)
                    if not isinstance(doc, dict):
                        continue
                    self._manifests[shard] = cached = (stamp, doc)
            except (OSError, ValueError):
                continue
            out[shard] = cached[1]
        return out

    def config(self) -> dict[str, Any]:
        """The resolved pipeline config from manifest.json ({} before the run finished)."""
        try:
            doc = read_json(index_path(self.out))
        except (OSError, ValueError):
            return {}
        return doc.get("config", {}) if isinstance(doc, dict) and isinstance(doc.get("config"), dict) else {}

    def shard_stages(self) -> dict[int, dict[str, Any]]:
        return {shard: doc["stages"] for shard, doc in self.manifests().items() if isinstance(doc.get("stages"), dict)}

    # API documents
    def info(self) -> dict[str, Any]:
        """The dataset's name and what the gallery's filters can offer."""
        self.refresh()
        identities: dict[str, dict[str, Any]] = {}
        for stages in self.shard_stages().values():
            for stage, ident in stages.items():
                if isinstance(ident, dict):
                    value = f"{stage}:{ident.get('backend')}:{ident.get('version')}"
                    identities.setdefault(value, {"value": value, "stage": stage, "backend": ident.get("backend"),
                                                  "version": ident.get("version"), "model": ident.get("model"),
                                                  "shards": 0})["shards"] += 1
        counts, fields = self._sample_facts()
        return {
            "out": str(self.out), "name": self.out.resolve().name, "samples": len(self.index.samples),
            "shards": sorted(self.index.shards), "layer_counts": counts, "fields": fields,
            "stages": sorted(identities.values(), key=lambda d: d["value"]),
            "run": self.run.name if self.run is not None else None,
        }

    def _sample_facts(self) -> tuple[dict[int, int], list[str]]:
        """Samples per layer count and the numeric fields, computed once per version of the index."""
        samples = self.index.samples
        cached = self._facts
        if cached is None or cached[0] is not samples:
            counts: dict[int, int] = {}
            for s in samples:
                counts[s.layers] = counts.get(s.layers, 0) + 1
            cached = self._facts = (samples, dict(sorted(counts.items())), self.index.numeric_fields())
        return cached[1], cached[2]

    def select(self, q: GalleryQuery) -> list[IndexedSample]:
        """The samples matching ``q``, in its order."""
        shard_stages = self.shard_stages() if q.stages else {}

        def stage_ok(shard: int) -> bool:
            stages = shard_stages.get(shard, {})
            for stage, backend, version in q.stages:
                ident = stages.get(stage)
                if not isinstance(ident, dict) or str(ident.get("backend")) != backend:
                    return False
                if version is not None and str(ident.get("version")) != version:
                    return False
            return True

        chosen = []
        for s in self.index.samples:
            if q.layers is not None and s.layers not in q.layers:
                continue
            if q.shards is not None and s.shard not in q.shards:
                continue
            if q.text and q.text not in s.text:
                continue
            if any(f not in s.numbers or (lo is not None and s.numbers[f] < lo)
                   or (hi is not None and s.numbers[f] > hi) for f, lo, hi in q.ranges):
                continue
            if q.stages and not stage_ok(s.shard):
                continue
            chosen.append(s)
        if q.sort == "key":
            chosen.sort(key=lambda s: s.key, reverse=q.descending)
        elif q.sort != "position":
            have = [s for s in chosen if q.sort in s.numbers]
            have.sort(key=lambda s: (s.numbers[q.sort], s.position), reverse=q.descending)
            chosen = have + [s for s in chosen if q.sort not in s.numbers]  # missing values last
        elif q.descending:
            chosen.reverse()
        return chosen

    def sample_doc(self, s: IndexedSample) -> dict[str, Any]:
        """A sample's card: its json's captions, layers and quality, and the URLs of its images."""
        try:
            meta = json.loads(self.index.read_members(s, ["json"]).get("json", b"{}").decode("utf-8"))
        except (LookupError, OSError, UnicodeDecodeError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        layers = [layer for layer in meta.get("layers", []) if isinstance(layer, dict)] \
            if isinstance(meta.get("layers"), list) else []
        version = self.index.shards[s.shard]["tar"]["mtime_ns"]
        bg = meta.get("background") if isinstance(meta.get("background"), dict) else {}
        source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        return {
            "key": s.key, "shard": s.shard, "width": meta.get("width"), "height": meta.get("height"),
            "caption": meta.get("caption", ""), "background_caption": bg.get("caption", ""),
            "source": source.get("uri"), "quality": meta.get("quality", {}),
            "layers": [{k: layer.get(k) for k in ("index", "phrase", "caption", "box", "score", "area")}
                       for layer in layers],
            "sprite": f"/sprite/{s.key}.png?v={version}",
            "parts": ["image", "bg", *(f"layer-{n}" for n in range(len(layers)))],
        }

    def gallery(self, query: str) -> dict[str, Any]:
        self.refresh()
        q = parse_gallery_query(query, set(self._sample_facts()[1]))
        chosen = self.select(q)
        pages = max(1, math.ceil(len(chosen) / q.per_page))
        start = (q.page - 1) * q.per_page
        page = chosen[start:start + q.per_page]
        # What shows first on this page and on the next ("next" is the usual click), then the rest.
        following = chosen[start + q.per_page:start + 2 * q.per_page]
        for future in self._pending:
            future.cancel()  # the pages asked for before this one: no longer worth decoding
        self._pending = [self._warmer.submit(self._warm, s.key) for s in
                         page[:FIRST_SCREEN] + following[:FIRST_SCREEN] + page[FIRST_SCREEN:] + following[FIRST_SCREEN:]]
        return {"total": len(chosen), "dataset_samples": len(self.index.samples), "page": q.page,
                "per_page": q.per_page, "pages": pages, "samples": [self.sample_doc(s) for s in page]}

    def _warm(self, key: str) -> None:
        try:
            self.sprite(key)
        except HttpError:
            pass  # the browser's own request reports it

    def sprite(self, key: str) -> bytes:
        """A sample's images as one RGBA PNG strip: image, background, layer 0..K-1 side by side.

        A gallery card makes one request instead of 2 + K: per request, Chromium spends more CPU
        than on decoding the pixels (BENCHMARKS.md)."""
        s = self.index.by_key.get(key) if KEY_PATTERN.match(key) else None
        if s is None:
            raise HttpError(404, "no such sample")
        version = self.index.shards[s.shard]["tar"]["mtime_ns"]
        cached = self.parts.get((key, version))
        if cached is not None:
            return cached
        with self._decode_locks[hash(key) % len(self._decode_locks)]:
            cached = self.parts.get((key, version))
            if cached is not None:
                return cached
            try:
                d = sample_layers(key, self.index.read_members(s))
                opaque = np.full((*d.image.shape[:2], 1), 255, np.uint8)
                strip = np.concatenate([np.concatenate([d.image, opaque], axis=2),
                                        np.concatenate([d.background, opaque], axis=2), *d.layers], axis=1)
            except LookupError:
                self.index.refresh()
                raise HttpError(404, f"{key}: its shard changed; reload the page") from None
            except (OSError, ValueError, KeyError) as err:
                raise HttpError(404, f"{key} is not decodable: {err}") from None
            data = png_bytes(strip)
            self.parts.put((key, version), data)
        return data

    def rejections(self) -> dict[str, Any]:
        """Every rejection of every manifest, grouped by stage and normalised reason (largest first)."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for shard, doc in self.manifests().items():
            rejected = doc.get("rejected") if isinstance(doc.get("rejected"), list) else []
            for i, item in enumerate(rejected):
                if not isinstance(item, dict):
                    continue
                stage, reason = str(item.get("stage")), str(item.get("reason", ""))
                groups.setdefault((stage, normalize_reason(reason)), []).append({
                    "shard": shard, "index": i, "key": item.get("key"), "source": item.get("source"),
                    "reason": reason, "thumb": f"/api/rejected/{shard}/{i}"})
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return {"total": sum(len(v) for v in groups.values()),
                "groups": [{"stage": s, "reason": r, "count": len(items), "items": items}
                           for (s, r), items in ordered]}

    def rejected_thumb(self, shard: int, index: int) -> dict[str, Any]:
        """``{"readable": true, "png": base64}`` thumbnail of a rejected source, or
        ``{"readable": false, "why": ...}``; 404 when the manifest has no such rejection."""
        doc = self.manifests().get(shard)
        rejected = doc.get("rejected") if doc is not None else None
        if not isinstance(rejected, list) or not 0 <= index < len(rejected) or not isinstance(rejected[index], dict):
            raise HttpError(404, "no such rejection")
        cached = self._thumbs.get((shard, index))
        if cached is None:
            cached = self._thumbs[(shard, index)] = source_thumbnail(str(rejected[index].get("source", "")),
                                                                       self.config())
        return cached

    def stats(self) -> dict[str, Any]:
        return summarize(self.out)

    def run_doc(self) -> dict[str, Any]:
        """The run's loss log and its sample grids by step."""
        if self.run is None:
            raise HttpError(404, "no run folder was given (--run runs/NAME)")
        rows: list[dict[str, float]] = []
        log = self.run / "train_log.csv"
        if log.is_file():
            from model.trainlog import read_log  # torch: imported only when a run is browsed

            rows = read_log(log)
        grids = []
        folder = self.run / "samples"
        if folder.is_dir():
            for path in folder.iterdir():
                m = GRID.match(path.name)
                if m and path.is_file():
                    grids.append({"name": path.name, "step": int(m.group(1)) if m.group(1) else None,
                                  "url": f"/runfile/samples/{path.name}"})
        grids.sort(key=lambda g: (g["step"] is not None, g["step"] or 0))
        columns = sorted({k for r in rows for k in r} - {"step"})
        return {"name": self.run.name, "path": str(self.run), "columns": columns, "rows": rows, "grids": grids}

    def run_file(self, sub: str, name: str) -> bytes:
        """A sample grid PNG of the run (only ``samples/step-N.png`` and ``samples/reference.png``)."""
        if self.run is None or sub != "samples" or not GRID.match(name):
            raise HttpError(404, "no such file")
        path = self.run / sub / name
        try:
            if not path.resolve().is_relative_to(self.run.resolve()) or not path.is_file():
                raise HttpError(404, "no such file")
            return path.read_bytes()
        except OSError:
            raise HttpError(404, "no such file") from None


def source_thumbnail(uri: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A thumbnail of a rejected item's source, read as the decode stage reads it
    (``datagen.sources.read_item``, with its folder and tar-member guards and the bomb limit)."""
    from datagen.sources import SourceReadError, read_item, tar_item
    from datagen.stages.decode import load_image

    source = config.get("source") if isinstance(config.get("source"), dict) else {}
    size = config.get("image_size") if isinstance(config.get("image_size"), int) else 256
    kind, _, rest = uri.partition(":")
    if kind in ("scene", "scene-gt") and rest.isdigit():
        desc: dict[str, Any] = {"kind": kind, "seed": int(rest)}
    elif kind == "skimage" and rest and "/" not in rest:
        desc = {"kind": "skimage", "file": rest, "caption": ""}
    elif kind == "file" and source.get("path"):
        root = Path(str(source["path"]))
        rel = Path(rest)
        if rel.is_absolute() or ".." in rel.parts:
            return {"readable": False, "why": "source path leaves the source folder"}
        desc = {"kind": "file", "path": str(root / rel), "root": str(root.resolve())}
    elif kind == "tar" and "#" in rest:
        tar, _, key = rest.partition("#")
        found = tar_item(tar, key)  # the source listing's own grouping and member offsets
        if found is None:
            return {"readable": False, "why": f"source tar {tar} has no item {key!r}"}
        desc = found
    else:
        return {"readable": False, "why": f"source {uri!r} cannot be located from the manifests"}
    try:
        raw = read_item(desc, size)
        if raw.array is not None:
            img = Image.fromarray(np.asarray(raw.array, dtype=np.uint8))
        else:
            if not raw.data:
                return {"readable": False, "why": "empty file"}
            img = load_image(raw.data, THUMB_MAX_PIXELS)
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except (SourceReadError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, KeyError) as err:
        return {"readable": False, "why": f"{type(err).__name__}: {err}"[:300]}
    return {"readable": True, "png": base64.b64encode(buf.getvalue()).decode("ascii")}


# -- HTTP ------------------------------------------------------------------------------------------


def page_html() -> bytes:
    """index.html with its static files linked by version (their mtimes)."""
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    for name in STATIC:
        html = html.replace(f"/static/{name}\"", f"/static/{name}?v={(WEB_DIR / name).stat().st_mtime_ns}\"")
    return html.encode("utf-8")


class Handler(BaseHTTPRequestHandler):
    """Routes GET requests to the :class:`Browser` of the server; everything else is an error."""

    server: BrowserServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes on a kept-alive connection: without TCP_NODELAY, Nagle's
    # algorithm holds the body until the client's delayed ACK (~40 ms per image).
    disable_nagle_algorithm = True
    server_version = "layerdiff-browse"
    error_content_type = "application/json"
    error_message_format = '{"error": "%(message)s", "status": %(code)d}'

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=86400, immutable" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, doc: Any, status: int = 200) -> None:
        self._send(status, json.dumps(doc, allow_nan=False, default=str).encode("utf-8"),
                   "application/json; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._route()
        except HttpError as err:
            self._json({"error": str(err), "status": err.status}, err.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            self.log_error("error on %s: %r", self.path, err)
            self._json({"error": f"internal error: {type(err).__name__}", "status": 500}, 500)

    do_HEAD = do_GET

    def _route(self) -> None:
        split = urlsplit(self.path)
        raw = split.path
        if "\x00" in unquote(raw) or "\\" in unquote(raw):
            raise HttpError(404, "not found")
        parts = [unquote(p) for p in raw.split("/")[1:]]
        b = self.server.browser
        if raw in PAGES:
            if split.query and raw != "/":
                raise HttpError(400, "this page takes no query")
            self._send(200, page_html(), "text/html; charset=utf-8")
        elif len(parts) == 2 and parts[0] == "static" and parts[1] in STATIC:
            # The page links them with ?v=<their mtime>, so a browser may keep them.
            self._send(200, (WEB_DIR / parts[1]).read_bytes(), STATIC[parts[1]], cache=bool(split.query))
        elif raw == "/api/info":
            self._json(b.info())
        elif raw == "/api/samples":
            self._json(b.gallery(split.query))
        elif raw == "/api/rejections":
            self._json(b.rejections())
        elif len(parts) == 4 and parts[:2] == ["api", "rejected"] and parts[2].isdigit() and parts[3].isdigit():
            self._json(b.rejected_thumb(int(parts[2]), int(parts[3])))
        elif raw == "/api/stats":
            self._json(b.stats())
        elif raw == "/api/run":
            self._json(b.run_doc())
        elif len(parts) == 2 and parts[0] == "sprite" and parts[1].endswith(".png"):
            self._send(200, b.sprite(parts[1][:-4]), "image/png", cache=True)
        elif len(parts) == 3 and parts[0] == "runfile":
            self._send(200, b.run_file(parts[1], parts[2]), "image/png")
        else:
            raise HttpError(404, "not found")

    def _not_allowed(self) -> None:
        self._json({"error": "read-only: only GET and HEAD", "status": 405}, 405)

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed


class BrowserServer(ThreadingHTTPServer):
    """A threading HTTP server around a :class:`Browser`."""

    daemon_threads = True

    def __init__(self, browser: Browser, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False) -> None:
        self.browser, self.verbose = browser, verbose
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def serve(out: str | Path, run: str | Path | None = None, host: str = "127.0.0.1", port: int = 8765,
          cache_dir: Path | None = None, verbose: bool = False,
          ready: Callable[[BrowserServer], None] | None = None) -> None:
    """Index ``out`` and serve it until interrupted."""
    t0 = time.perf_counter()
    browser = Browser(out, run, cache_dir)
    server = BrowserServer(browser, host, port, verbose)
    print(f"indexed {len(browser.index.samples)} samples in {len(browser.index.shards)} shards "
          f"({time.perf_counter() - t0:.1f} s; index cache: {browser.index.cache_folder or 'memory only'})")
    print(f"browse {out} at {server.url}  (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
