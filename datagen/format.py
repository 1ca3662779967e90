"""The layered dataset format (docs/FORMAT.md): members, composition, checks, the one reader.

This module is the single definition of the format. Version 2 (written today) stores each
foreground as one 8-bit RGBA layer with soft alpha and straight colours, all layers of a sample
stacked in one member (``KEY.layers.png``) so that every WebDataset reader sees the same members
in every sample; version 1 (binary masks, ``fg.N``/``mask.N`` members) stays readable.
:func:`read_sample` turns a sample's members, as bytes or as any common loader decoded them,
into a :class:`LayerSample` for either version. Writers, validators, previewers and the model
package all compose layers with :func:`compose_layers`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 2  # what writers write; readers and the validator also take version 1
VERSIONS = (1, 2)
SCHEMA_NAMES = {"sample": "layerdiff", "shard": "layerdiff-shard", "dataset": "layerdiff-dataset"}
SAMPLE_SCHEMA = f"layerdiff/{FORMAT_VERSION}"
SHARD_SCHEMA = f"layerdiff-shard/{FORMAT_VERSION}"
DATASET_SCHEMA = f"layerdiff-dataset/{FORMAT_VERSION}"
EXTENTS = ("visible", "amodal")  # layers[n].extent: the visible part only, or the whole object
LAYERS_MEMBER = "layers.png"  # format 2: every layer of a sample, stacked top to bottom, RGBA
MIN_RECON_PSNR = 30.0
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
PSNR_CAP = 100.0  # identical images: report a finite number so JSON stays valid


def compose_layers(background: Any, foregrounds: Sequence[Any], alphas: Sequence[Any]) -> Any:
    """Composite foregrounds over a background, back (index 0) to front.

    ``I = bg; for n: I = a_n * fg_n + (1 - a_n) * I``. Works on numpy arrays and torch tensors
    alike (plain arithmetic only); every alpha must broadcast against the images and lie in
    [0, 1] (continuous: soft alpha composes by the same rule). Use :func:`mask_to_alpha` for
    8-bit alphas in HWC layout.
    """
    if len(foregrounds) != len(alphas):
        raise ValueError(f"{len(foregrounds)} foregrounds but {len(alphas)} alphas")
    out = background
    for fg, alpha in zip(foregrounds, alphas, strict=False):
        out = alpha * fg + (1 - alpha) * out
    return out


def mask_to_alpha(mask: np.ndarray) -> np.ndarray:
    """8-bit alpha (H, W), 0..255, to a float32 alpha (H, W, 1) in [0, 1]."""
    return (np.asarray(mask, dtype=np.float32) / 255.0)[..., None]


def compose_uint8(background: np.ndarray, foregrounds: Sequence[np.ndarray],
                  masks: Sequence[np.ndarray]) -> np.ndarray:
    """Compose 8-bit straight RGB layers with their 8-bit alphas into an 8-bit RGB image."""
    out = compose_layers(background.astype(np.float32),
                         [f.astype(np.float32) for f in foregrounds],
                         [mask_to_alpha(m) for m in masks])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB between two 8-bit images, optionally only where a boolean (H, W) mask holds."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if where is not None:
        diff = diff[where.astype(bool)]
    if diff.size == 0:
        return PSNR_CAP
    mse = float(np.mean(diff * diff))
    if mse <= 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(255.0 * 255.0 / mse))


class FormatError(ValueError):
    """A sample breaks the format; the message names the shard (``where``), key and member."""

    def __init__(self, detail: str, key: str | None = None, member: str | None = None,
                 where: str | None = None) -> None:
        self.detail, self.key, self.member, self.where = detail, key, member, where
        super().__init__(self.located())

    def located(self, shard: bool = True, key: bool = True) -> str:
        """The message; without the shard or key when the caller names them already."""
        parts = []
        if shard and self.where:
            parts.append(f"shard {self.where}")
        if key and self.key:
            parts.append(f"key {self.key}")
        if self.member:
            parts.append(f"member {self.key}.{self.member}" if self.key else f"member {self.member}")
        return f"{', '.join(parts)}: {self.detail}" if parts else self.detail


def schema_version(value: Any, kind: str = "sample") -> int:
    """The format version named by a document's ``schema`` string (``"layerdiff/2"`` -> 2).

    Raises :class:`FormatError` for anything else: a version this code does not know must not be
    read as if it were one it knows.
    """
    prefix = SCHEMA_NAMES[kind]
    known = ", ".join(f"{prefix}/{v}" for v in VERSIONS)
    if isinstance(value, str) and value.startswith(prefix + "/"):
        number = value[len(prefix) + 1:]
        if number.isdigit() and int(number) in VERSIONS:
            return int(number)
    raise FormatError(f"unknown format version: schema is {value!r}, this reader knows {known}")


def schema_string(version: int, kind: str = "sample") -> str:
    """``schema`` value of a ``kind`` document ("sample", "shard", "dataset") in ``version``."""
    return f"{SCHEMA_NAMES[kind]}/{version}"


_CHANNELS = {"L": 2, "RGB": 3, "RGBA": 4}  # array rank (L) or channel count


def encode_png(array: np.ndarray) -> bytes:
    """Encode an (H, W) L, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array as PNG."""
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {array.dtype}")
    mode = "L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[2]]
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """Decode PNG bytes into a uint8 array, checking that it is stored in ``mode``."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"not a PNG ({img.format})")
        if img.mode != mode:
            raise ValueError(f"PNG mode {img.mode}, expected {mode}")
        return np.asarray(img.convert(mode))


def stack_layers(foregrounds: Sequence[np.ndarray], alphas: Sequence[np.ndarray]) -> np.ndarray:
    """Format 2's ``layers.png`` pixels: each layer as RGBA, stacked top to bottom, (K*H, W, 4)."""
    return np.concatenate([np.dstack([fg, alpha]) for fg, alpha in zip(foregrounds, alphas, strict=True)])


@dataclass
class LayerSample:
    """One layered sample, as stored in a shard (format 1 or 2).

    ``foregrounds[n]`` (uint8 (H, W, 3), straight colours, 0 where the layer is transparent) and
    ``masks[n]`` (its 8-bit alpha, uint8 (H, W), 0..255; format 1 holds only 0 and 255) are layer
    n, 0 = back-most. ``meta`` is the KEY.json document; its ``schema`` names the format version
    the sample is stored in (format 2 while it has none).
    """

    key: str
    image: np.ndarray
    background: np.ndarray
    foregrounds: list[np.ndarray]
    masks: list[np.ndarray]
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.foregrounds)

    @property
    def version(self) -> int:
        """The format version of the sample: from ``meta["schema"]``; FORMAT_VERSION when unset."""
        schema = self.meta.get("schema") if isinstance(self.meta, dict) else None
        return FORMAT_VERSION if schema is None else schema_version(schema)

    def rgba(self) -> np.ndarray:
        """The layers as straight-alpha RGBA, uint8 (K, H, W, 4), back-most first."""
        return np.stack([np.dstack([fg, a]) for fg, a in zip(self.foregrounds, self.masks, strict=True)])

    def recompose(self) -> np.ndarray:
        return compose_uint8(self.background, self.foregrounds, self.masks)

    def to_members(self) -> dict[str, bytes]:
        """The sample's tar members in its format version, in write order (suffix -> bytes)."""
        members: dict[str, bytes] = {
            "image.png": encode_png(self.image),
            "bg.png": encode_png(self.background),
        }
        if self.version == 1:
            for n, (fg, mask) in enumerate(zip(self.foregrounds, self.masks, strict=True)):
                members[f"fg.{n}.png"] = encode_png(fg)
                members[f"mask.{n}.png"] = encode_png(mask)
        else:
            members[LAYERS_MEMBER] = encode_png(stack_layers(self.foregrounds, self.masks))
        members["txt"] = self.caption.encode("utf-8")
        members["json"] = json.dumps(self.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return members

    @classmethod
    def from_members(cls, key: str, members: Mapping[str, Any]) -> LayerSample:
        """:func:`read_sample` for a known key."""
        return read_sample(members, key=key)


# -- the one reader -------------------------------------------------------------------------------


def _member_array(members: Mapping[str, Any], suffix: str, mode: str, key: str, where: str | None) -> np.ndarray:
    """Member ``suffix`` as a uint8 array in ``mode``, whether it is PNG bytes (tarfile,
    webdataset), ``{"bytes": ...}`` (Hugging Face with ``decode=False``), a PIL image (Hugging Face)
    or an array (Ray Data)."""
    if suffix not in members or members[suffix] is None:
        raise FormatError("missing", key, suffix, where)
    value = members[suffix]
    try:
        if isinstance(value, Mapping) and "bytes" in value:
            value = value["bytes"]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_png(bytes(value), mode)
        if isinstance(value, Image.Image):
            value = np.asarray(value)
        if isinstance(value, np.ndarray):
            if mode == "RGB" and value.ndim == 3 and value.shape[2] == 4 and (value[..., 3] == 255).all():
                value = value[..., :3]  # a loader decoding everything as RGBA (webdataset "rgba8")
            rank_ok = value.ndim == 2 if mode == "L" else (value.ndim == 3 and value.shape[2] == _CHANNELS[mode])
            if value.dtype != np.uint8 or not rank_ok:
                hint = (" (the loader dropped the alpha channel: decode this member as RGBA, e.g. webdataset "
                        "'pilrgba' or 'rgba8', or pass its bytes)") if mode == "RGBA" and value.ndim == 3 else ""
                raise ValueError(f"decoded as a {value.dtype} {value.shape} array, not a uint8 {mode} image{hint}")
            return np.ascontiguousarray(value)
        raise TypeError(f"cannot read a {type(value).__name__} as an image")
    except Exception as err:  # noqa: BLE001 - every way a member fails to decode is reported
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip()
        raise FormatError(f"unreadable ({mode} PNG expected): {type(err).__name__}: {detail}",
                          key, suffix, where) from err


def _member_text(members: Mapping[str, Any], suffix: str, key: str, where: str | None) -> str:
    value = members.get(suffix)
    if value is None:
        raise FormatError("missing", key, suffix, where)
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError) as err:
        raise FormatError(f"unreadable (UTF-8 text expected): {err}", key, suffix, where) from err


def _member_json(members: Mapping[str, Any], key: str, where: str | None) -> dict[str, Any]:
    value = members.get("json")
    if value is None:
        raise FormatError("missing", key, "json", where)
    if not isinstance(value, Mapping):
        try:
            value = json.loads(value if isinstance(value, str) else bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, TypeError, ValueError) as err:
            raise FormatError(f"unreadable (UTF-8 JSON expected): {err}", key, "json", where) from err
    if not isinstance(value, Mapping):
        raise FormatError(f"is a JSON {type(value).__name__}, not an object", key, "json", where)
    return dict(value)


def read_sample(members: Mapping[str, Any], key: str | None = None, where: str | None = None) -> LayerSample:
    """Decode one sample of format 1 or 2 into a :class:`LayerSample` (RGBA layers as colours +
    8-bit alphas). The one reader of the format: every reader in the project goes through it.

    ``members`` maps suffix -> member, e.g. a webdataset, Hugging Face ``datasets`` or Ray Data
    row (``__key__``/``__url__`` give ``key``/``where`` when not passed); members may be bytes or
    already decoded by the loader. Raises :class:`FormatError` naming the shard (``where``), key and
    member on a missing or undecodable member, an unknown format version or a layer of the wrong
    size. The full set of rules is :func:`check_sample`.
    """
    key = key if key is not None else os.path.basename(str(members.get("__key__", "")))
    where = where if where is not None else members.get("__url__")
    meta = _member_json(members, key, where)
    try:
        version = schema_version(meta.get("schema"))
    except FormatError as err:
        raise FormatError(err.detail, key, "json", where) from None
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FormatError("json layers must be a non-empty list (one item per layer)", key, "json", where)
    image = _member_array(members, "image.png", "RGB", key, where)
    h, w = image.shape[:2]
    background = _member_array(members, "bg.png", "RGB", key, where)
    if background.shape != image.shape:
        raise FormatError(f"is {background.shape[1]}x{background.shape[0]}, the image is {w}x{h}",
                          key, "bg.png", where)
    k = len(layers)
    fgs, alphas = [], []
    if version == 1:
        for n in range(k):
            fg = _member_array(members, f"fg.{n}.png", "RGB", key, where)
            mask = _member_array(members, f"mask.{n}.png", "L", key, where)
            for suffix, arr in ((f"fg.{n}.png", fg), (f"mask.{n}.png", mask)):
                if arr.shape[:2] != (h, w):
                    raise FormatError(f"is {arr.shape[1]}x{arr.shape[0]}, the image is {w}x{h}", key, suffix, where)
            fgs.append(fg)
            alphas.append(mask)
    else:
        stack = _member_array(members, LAYERS_MEMBER, "RGBA", key, where)
        if stack.shape[:2] != (k * h, w):
            raise FormatError(f"is {stack.shape[1]}x{stack.shape[0]}, expected {w}x{k * h} "
                              f"({k} layers of {w}x{h} stacked top to bottom)", key, LAYERS_MEMBER, where)
        for n in range(k):
            layer = stack[n * h:(n + 1) * h]
            fgs.append(np.ascontiguousarray(layer[..., :3]))
            alphas.append(np.ascontiguousarray(layer[..., 3]))
    caption = _member_text(members, "txt", key, where)
    return LayerSample(key=key, image=image, background=background, foregrounds=fgs, masks=alphas,
                       caption=caption, meta=meta)


def check_sample(sample: LayerSample, max_layers: int | None = None,
                 members: Mapping[str, bytes] | None = None) -> list[str]:
    """Every way ``sample`` breaks the format (an empty list when it conforms)."""
    problems: list[str] = []
    key, meta = sample.key, sample.meta
    if not KEY_PATTERN.match(key):
        problems.append(f"key {key!r} is not [A-Za-z0-9_-]+ (no dots)")
    try:
        version = schema_version(meta.get("schema"))
    except FormatError as err:
        return problems + [f"json {err.detail}"]
    if meta.get("key") != key:
        problems.append(f"json key {meta.get('key')!r} != member key {key!r}")
    h, w = sample.image.shape[:2]
    if sample.image.ndim != 3 or sample.image.shape[2] != 3:
        problems.append(f"image shape {sample.image.shape} is not (H, W, 3)")
    if (meta.get("width"), meta.get("height")) != (w, h):
        problems.append(f"json size {meta.get('width')}x{meta.get('height')} != image {w}x{h}")
    if sample.background.shape != sample.image.shape:
        problems.append(f"bg shape {sample.background.shape} != image {sample.image.shape}")
    k = sample.num_layers
    if k < 1 or (max_layers is not None and k > max_layers):
        problems.append(f"{k} layers, expected 1..{max_layers or 'max_layers'}")
    if members is not None:
        extra = {m for m in set(members) - set(member_suffixes(k, version)) if not m.startswith("__")}
        if extra:
            problems.append(f"unexpected members {sorted(extra)}")
    layers = meta.get("layers", [])
    for n, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks, strict=False)):
        name = f"mask.{n}" if version == 1 else f"layer {n} alpha"
        if fg.shape != sample.image.shape:
            problems.append(f"fg.{n} shape {fg.shape} != image {sample.image.shape}")
            continue
        if mask.shape != (h, w):
            problems.append(f"{name} shape {mask.shape} != ({h}, {w})")
            continue
        if version == 1 and not np.isin(mask, (0, 255)).all():
            problems.append(f"{name} is not binary (0/255)")
        if not mask.any():
            problems.append(f"{name} is empty" if version == 1 else f"layer {n} is fully transparent")
        if fg[mask == 0].any():
            problems.append(f"fg.{n} has non-zero pixels outside its mask" if version == 1
                            else f"layer {n} has colour where its alpha is 0 (must be 0 there)")
        if version >= 2 and n < len(layers) and isinstance(layers[n], dict) \
                and layers[n].get("extent") not in EXTENTS:
            problems.append(f"json layers[{n}].extent is {layers[n].get('extent')!r}, expected one of {EXTENTS}")
    if sample.caption != meta.get("caption"):
        problems.append("txt differs from json caption")
    for n, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("index") != n:
            problems.append(f"json layers[{n}].index is {layer.get('index') if isinstance(layer, dict) else layer}")
    if not problems:
        recon = psnr(sample.recompose(), sample.image)
        if recon < MIN_RECON_PSNR:
            problems.append(f"recomposition PSNR {recon:.1f} dB < {MIN_RECON_PSNR} dB")
        recorded = meta.get("quality", {}).get("recon_psnr")
        if recorded is None or abs(recorded - recon) > 0.05:
            problems.append(f"quality.recon_psnr {recorded} != measured {recon:.2f}")
    return problems


def member_suffixes(num_layers: int, version: int = FORMAT_VERSION) -> list[str]:
    """The member suffixes of a sample with ``num_layers`` layers in ``version``, in write order."""
    suffixes = ["image.png", "bg.png"]
    if version == 1:
        for n in range(num_layers):
            suffixes += [f"fg.{n}.png", f"mask.{n}.png"]
    else:
        suffixes.append(LAYERS_MEMBER)
    return suffixes + ["txt", "json"]


def split_member_name(name: str) -> tuple[str, str]:
    """``KEY.suffix`` -> (KEY, suffix); the suffix starts at the first dot, as in webdataset."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        raise ValueError(f"member {name!r} has no suffix")
    key, suffix = base.split(".", 1)
    return (name[: len(name) - len(base)] + key), suffix


@dataclass
class TarSample:
    """One sample's members as read from a shard (suffix -> bytes) and its grouping problems.

    ``key`` is empty for an entry that belongs to no sample (a directory, a name without a
    suffix); such a group has no members and one problem naming the entry.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def iter_tar_samples(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[TarSample]:
    """Stream a shard's samples in tar order, one group per run of members sharing a key.

    Layout problems never raise; they are reported in the groups' ``problems``: a key whose
    members are not contiguous (the key is yielded again, flagged, each time it reappears), a
    member repeated within a sample (the first copy is kept), an entry that is not a regular
    file or has no suffix. A damaged tar raises ``tarfile.TarError`` (or ``OSError``).
    """
    if isinstance(source, (str, os.PathLike)):
        tar = tarfile.open(source, mode="r|")
    else:
        tar = tarfile.open(fileobj=source, mode="r|")
    with tar:
        # a member's data is read while the stream is at it (the generator is consumed in step)
        yield from group_tar_members((info, _read_member(tar, info)) for info in tar)


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info) if info.isfile() else None
    return handle.read() if handle is not None else b""


def group_tar_members(entries: Iterable[tuple[tarfile.TarInfo, Any]]) -> Iterator[TarSample]:
    """The one grouping rule of tar members into samples, over ``(member, payload)`` in tar order.

    The payload is what a group's ``members`` map each suffix to: the bytes for
    :func:`iter_tar_samples`, or where the bytes are (a source listing reads them later).
    Problems are reported as :func:`iter_tar_samples` describes.
    """
    seen: set[str] = set()
    current: TarSample | None = None
    for info, payload in entries:
        if not info.isfile():
            yield TarSample("", {}, [f"tar entry {info.name!r} is not a regular file"])
            continue
        try:
            key, suffix = split_member_name(info.name)
        except ValueError as err:
            yield TarSample("", {}, [str(err)])
            continue
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = TarSample(key)
            if key in seen:
                current.problems.append(
                    f"members of {key} are not contiguous (the key reappears after other samples)")
            seen.add(key)
        if suffix in current.members:
            current.problems.append(f"duplicate member {info.name}")
        else:
            current.members[suffix] = payload
    if current is not None:
        yield current
