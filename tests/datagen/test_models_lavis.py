"""The ``lavis`` caption backend, whose model code runs in its own env (.venv-lavis).

The driver-side classmethods (check, identity, runtime_env) run here in the main env; the tiny model is
built and run by the LAVIS env's interpreter, directly (subprocess) and as a Ray actor through
``runtime_env``, the way the pipeline runs it. Records cross the numpy 2 (here) / numpy 1 (there) boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datagen.item import Detection, Item
from datagen.registry import get_backend
from datagen.stages.base import StageContext
from datagen.stages.models.lavis import MODEL_YAML, LavisCaption, LavisParams, default_python

ROOT = Path(__file__).resolve().parents[2]
LAVIS_PY = default_python()
pytestmark = pytest.mark.skipif(
    not LAVIS_PY.exists(),
    reason=f"{LAVIS_PY} is absent: build the LAVIS env with `bash datagen/envs/setup_lavis.sh` (make test does)",
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def in_lavis_env(code: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    """Run ``code`` under the LAVIS env's interpreter from the repository root."""
    proc = subprocess.run([str(LAVIS_PY), "-W", "ignore", "-c", code, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def make_items() -> list[Item]:
    rng = np.random.default_rng(3)
    return [
        Item(
            key=f"s00000-{i:04d}",
            shard=0,
            index=i,
            uri=f"mem://{i}",
            source={},
            caption="from the source",
            image=rng.integers(0, 256, (40, 52, 3), dtype=np.uint8),
            detections=[Detection("cat", (1.0, 2.0, 30.0, 20.0), np.float32(0.5))],
        )  # fmt: skip
        for i in range(2)
    ]


def params(folder: Path, **kw: object) -> LavisParams:
    return LavisParams(model=str(folder), **{"num_beams": 2, "max_length": 6, "min_length": 1, **kw})


# One LAVIS-env process (importing lavis costs ~8 s): build the tiny model, run the actor's batch adapter
# on numpy-2 records, caption directly, and try two bad checkpoints.
_IN_ENV = r"""
import json, pickle, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1); torch.set_flush_denormal(True)
from datagen.stages.models.lavis import LavisCaption, LavisParams, build_model, read_spec
from datagen.tiny_weights.lavis import build
out_dir, records_in, records_out = sys.argv[1:4]
folder = str(build(Path(out_dir))["lavis_blip2_opt"])
stage = LavisCaption(LavisParams(model=folder, num_beams=2, max_length=6, min_length=1))
out = stage({"record": np.array(pickle.load(open(records_in, "rb")), dtype=object)})
pickle.dump(list(out["record"]), open(records_out, "wb"))
captions = stage.caption_images([np.zeros((30, 30, 3), np.uint8), np.full((60, 20, 3), 200, np.uint8)])
errors = {}
spec = read_spec(folder)
for name, content in {"foreign": {"model": {"foo.weight": torch.zeros(2)}}, "pickle": {"model": {}, "cfg": object}}.items():
    bad = spec.checkpoint.with_name(name + ".pth")
    torch.save(content, bad)
    try:
        build_model(spec.__class__(**{**spec.__dict__, "checkpoint": bad}), "cpu")
    except ValueError as err:
        errors[name] = str(err)
print(json.dumps({"folder": folder, "captions": captions, "errors": errors, "numpy": np.__version__}))
"""


@pytest.fixture(scope="module")
def lavis_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tiny_lavis")
    records_in, records_out = out / "in.pkl", out / "out.pkl"
    records_in.write_bytes(
        pickle.dumps([it.to_bytes() for it in make_items()])
    )  # numpy 2 pickles, as upstream
    proc = in_lavis_env(_IN_ENV, str(out), str(records_in), str(records_out))
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "records_out": records_out}


@pytest.fixture(scope="module")
def tiny(lavis_run: dict[str, Any]) -> Path:
    folder = Path(lavis_run["folder"])
    assert (folder / MODEL_YAML).is_file()
    return folder


def test_batch_in_lavis_env(lavis_run: dict[str, Any]) -> None:
    items, result, records_out = make_items(), lavis_run, lavis_run["records_out"]
    assert result["numpy"].startswith("1.")
    assert len(result["captions"]) == 2 and all(isinstance(c, str) for c in result["captions"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 1 pickles would warn here: the actor writes neutral ones
        out = [Item.from_bytes(b) for b in pickle.loads(records_out.read_bytes())]
    for before, after in zip(items, out, strict=True):
        assert after.ok, after.rejected
        assert after.key == before.key and after.caption and after.caption != "from the source"
        assert np.array_equal(after.image, before.image) and after.image.flags.writeable
        assert isinstance(after.detections[0].score, np.float32)
    assert "weights missing" in result["errors"]["foreign"] and "foreign.pth" in result["errors"]["foreign"]
    assert "allow_pickle" in result["errors"]["pickle"]


def test_driver_side(tiny: Path, tmp_path: Path) -> None:
    assert get_backend("caption", "lavis") is LavisCaption
    p = params(tiny)
    LavisCaption.check(p)
    env = LavisCaption.runtime_env(p)
    assert env["py_executable"] == str(LAVIS_PY) and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    ident = LavisCaption.identity(p)
    ckpt = tiny / "blip2_caption_opt_tiny.pth"
    assert ident["model"] == "lavis:blip2_opt/caption_coco_opt2.7b"
    assert ident["checkpoint"] == {"name": ckpt.name, "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}


def test_missing_files(tiny: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}.*{MODEL_YAML}"):
        LavisCaption.check(params(tmp_path / "nowhere"))
    for rel in (
        "blip2_caption_opt_tiny.pth",
        "eva_vit_g.pth",
        "bert-base-uncased/config.json",
        "bert-base-uncased/pytorch_model.bin",
        "opt/config.json",
        "opt/pytorch_model.bin",
    ):
        folder = tmp_path / rel.replace("/", "_")
        shutil.copytree(tiny, folder)
        (folder / rel).unlink()
        with pytest.raises(FileNotFoundError, match=f"{folder / rel}"):
            LavisCaption.check(params(folder))
    with pytest.raises(FileNotFoundError, match="setup_lavis.sh"):
        LavisCaption.check(params(tiny, python=str(tmp_path / "no-python")))


def test_wrong_format(tiny: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "garbage"
    shutil.copytree(tiny, folder)
    (folder / "blip2_caption_opt_tiny.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        LavisCaption.check(params(folder))
    spec = (tiny / MODEL_YAML).read_text()
    (folder / MODEL_YAML).write_text(spec.replace("arch: blip2_opt", "arch: blip2_image_text_matching"))
    with pytest.raises(ValueError, match="does not caption"):
        LavisCaption.check(params(folder))
    (folder / MODEL_YAML).write_text("arch: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        LavisCaption.check(params(folder))


@pytest.mark.slow
def test_ray_actor_runs_in_lavis_env(tiny: Path, ray_local) -> None:  # noqa: ANN001 - the conftest fixture
    """map_batches(..., runtime_env=LavisCaption.runtime_env(params)): the actor runs under .venv-lavis."""
    ray = ray_local
    p = params(tiny)
    items = make_items()
    ds = ray.data.from_items([{"record": it.to_bytes()} for it in items])
    ds = ds.map_batches(
        LavisCaption,
        fn_constructor_kwargs={"params": p, "context": StageContext(num_cpus=1)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=2,
        batch_format="numpy",
        num_cpus=1,
        runtime_env=LavisCaption.runtime_env(p),
    )
    out = sorted((Item.from_bytes(r["record"]) for r in ds.take_all()), key=lambda it: it.key)
    assert [it.key for it in out] == [it.key for it in items]
    for it in out:
        assert it.ok, it.rejected
        assert it.caption and it.caption != "from the source"
