"""A corpus of bad and awkward inputs, to prove the pipeline rejects or normalises each one.

``python -m datagen.badinput DIR`` writes it as a folder source (and ``--tar`` as an
img2dataset-style tar with unsafe members). ``EXPECTED`` says what should happen to each file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> "accept" (normalised into a sample or rejected later for content) or
# "decode" (must be rejected at stage decode).
EXPECTED: dict[str, str] = {
    "zero_bytes.png": "decode",
    "truncated.jpg": "decode",
    "not_an_image.jpg": "decode",
    "notes.md": "decode",
    "bomb.png": "decode",
    "tiny.png": "decode",
    "escape_link.png": "decode",
    "cmyk.jpg": "accept",
    "sixteen_bit.png": "accept",
    "palette.png": "accept",
    "alpha.png": "accept",
    "exif_rotated.jpg": "accept",
    "animated.gif": "accept",
    "bad_caption.png": "accept",
    "huge_caption.png": "accept",
    "nested/deep/ok.png": "accept",
}


def _scene_rgb(size: int = 96) -> np.ndarray:
    """A plain scene with one red square, left of centre and high, on a green background: easy to
    decompose, and asymmetric so a wrong rotation shows."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = (40, 160, 60)
    s = size // 8
    img[s:4 * s, s:4 * s] = (220, 30, 30)
    return img


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_corpus(root: Path, outside: Path | None = None) -> dict[str, str]:
    """Write the corpus under ``root``; ``outside`` hosts the symlink target (outside root)."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_scene_rgb())
    files: dict[str, bytes] = {
        "zero_bytes.png": b"",
        "truncated.jpg": _save(rgb, "JPEG")[:300],
        "not_an_image.jpg": b"this is text pretending to be a jpeg\n" * 20,
        "notes.md": b"# not an image\n",
        "tiny.png": _save(Image.fromarray(_scene_rgb(8)), "PNG"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "sixteen_bit.png": _save(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
        "palette.png": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "bad_caption.png": _save(rgb, "PNG"),
        "huge_caption.png": _save(rgb, "PNG"),
        "nested/deep/ok.png": _save(rgb, "PNG"),
    }
    rgba = rgb.convert("RGBA")
    alpha = np.full((96, 96), 255, np.uint8)
    alpha[:10] = 0
    rgba.putalpha(Image.fromarray(alpha))
    files["alpha.png"] = _save(rgba, "PNG")
    # EXIF orientation 6: the stored pixels are rotated; the decoder must transpose them.
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif_rotated.jpg"] = _save(rgb.rotate(90, expand=True), "JPEG", exif=exif.tobytes())
    frames = [rgb, Image.fromarray(255 - _scene_rgb())]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.gif"] = buf.getvalue()
    # A decompression bomb: a small file that claims a huge canvas.
    files["bomb.png"] = _save(Image.new("1", (12000, 12000)), "PNG")
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "bad_caption.txt").write_bytes(b"a red \xff\xfe square on green")
    (root / "huge_caption.txt").write_text("a red square on a green background " * 2000)
    (root / "alpha.json").write_text(json.dumps({"license": "cc0"}))
    outside = outside or root.parent / f"{root.name}-outside"
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "secret.png"
    target.write_bytes(_save(rgb, "PNG"))
    link = root / "escape_link.png"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)
    return dict(EXPECTED)


def write_unsafe_tar(path: Path) -> dict[str, str]:
    """An img2dataset-style tar with one good sample and members that try to leave the tree."""
    rgb = _save(Image.fromarray(_scene_rgb()), "JPEG", quality=95)
    members = {
        "000000000.jpg": rgb, "000000000.txt": b"a red square on a green background",
        "000000000.json": json.dumps({"url": "http://example.invalid/0.jpg", "caption": "red square, green",
                                      "license": "CC-BY-4.0", "status": "success", "error_message": None,
                                      "key": "000000000"}).encode(),
        "../evil/000000001.jpg": rgb, "../evil/000000001.txt": b"escape",
        "/abs/000000002.jpg": rgb,
        "000000003.txt": b"a caption without an image",
    }
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return {"000000000": "accept", "000000001": "decode", "000000002": "decode", "000000003": "decode"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--tar", type=Path, help="also write an unsafe img2dataset-style tar here")
    args = parser.parse_args()
    expected = write_corpus(args.dir)
    if args.tar:
        write_unsafe_tar(args.tar)
    print(f"wrote {len(expected)} files to {args.dir}")


if __name__ == "__main__":
    main()
