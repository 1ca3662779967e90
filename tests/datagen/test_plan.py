"""Lazy planning: a source is listed a shard at a time as the stream needs it, and a rerun lists
from where the done shards ended, without opening the tars before."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from datagen import runner, sources
from datagen.bench import write_img2dataset_tars
from datagen.config import ConfigError, SourceConfig, load_config
from datagen.runner import ShardPlanner, run
from datagen.sources import iter_source, iter_source_from, list_items
from manifests.validate import validate_dataset
from tests.datagen.helpers import load_json, read_shard


def _tars(tmp_path: Path, n: int, per_tar: int) -> tuple[Path, str]:
    raw = tmp_path / "raw"
    return raw, write_img2dataset_tars(raw, n, per_tar=per_tar, size=48)


def _config(out: Path, pattern: str, shards: int, per_shard: int):
    return load_config("pipelines/default.yaml", {"output": str(out), "source_kind": "tars", "source_path": pattern,
                                                  "shards": shards, "samples_per_shard": per_shard,
                                                  "image": {"size": 48}, "max_rejection_rate": 1.0})


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The names of the tars opened (to list or to read), in order."""
    names: list[str] = []
    real = sources.open_uncompressed

    def recording(url: str):
        names.append(Path(url).name)
        return real(url)

    monkeypatch.setattr(sources, "open_uncompressed", recording)
    monkeypatch.setattr(sources, "_TARS", sources._OpenTars())
    return names


def _keys(items) -> list[str]:
    return [it.key for it in items]


def test_listing_from_a_position_is_the_rest_of_the_listing(tmp_path: Path):
    raw, pattern = _tars(tmp_path, 10, 4)  # tars of 4, 4 and 2 items
    cfg = SourceConfig(kind="tars", path=pattern)
    full = list(iter_source_from(cfg))
    assert [ref for ref, _ in full] == list_items(cfg, 100)
    assert [pos for _, pos in full] == [[0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3], [2, 0], [2, 1], [3, 0]]
    for i, (_, pos) in enumerate(full):
        assert [ref for ref, _ in iter_source_from(cfg, pos)] == [ref for ref, _ in full[i + 1:]]
    # the tars before the position are not opened: without the first tar the rest lists the same
    (raw / "00000.tar").unlink()
    assert [ref for ref, _ in iter_source_from(cfg, [1, 0])] == [ref for ref, _ in full[4:]]
    assert next(iter_source(cfg)).descriptor["kind"] == "tar-error"  # (from the start it is missed)
    scenes = SourceConfig(kind="synthetic-gt")
    assert next(iter_source_from(scenes, [5])) == (next(iter(list_items(scenes, 6)[5:])), [6])


def test_tars_that_share_a_name_are_refused(tmp_path: Path):
    for folder in ("a", "b"):
        write_img2dataset_tars(tmp_path / folder, 2, per_tar=2, size=48)
    cfg = _config(tmp_path / "out", str(tmp_path / "{a,b}" / "00000.tar"), 1, 4)
    with pytest.raises(ConfigError, match=r"tars .*a/00000.tar and .*b/00000.tar share the name '00000'"):
        run(cfg, engine="local", progress=False)


def test_planner_lists_a_shard_when_asked_in_any_order(tmp_path: Path, opened: list[str]):
    _, pattern = _tars(tmp_path, 10, 4)
    cfg = SourceConfig(kind="tars", path=pattern)
    refs = list_items(cfg, 100)
    opened.clear()
    planner = ShardPlanner(cfg, 3, todo=range(5))
    first = planner.items(0)
    assert _keys(first) == [r.key for r in refs[0:3]] and [(it.shard, it.index) for it in first] == [(0, 0), (0, 1), (0, 2)]
    assert opened == ["00000.tar"]  # nothing past shard 0 was read
    assert _keys(planner.items(2)) == [r.key for r in refs[6:9]]  # lists shard 1 on the way ...
    assert _keys(planner.items(1)) == [r.key for r in refs[3:6]]  # ... and keeps it
    assert _keys(planner.items(1)) == [r.key for r in refs[3:6]]  # asked again (a retried read): listed again
    assert _keys(planner.items(3)) == [refs[9].key]
    assert planner.items(4) == []
    assert planner.info(3) == (1, [3, 0]) and planner.info(1) == (3, [1, 2])
    assert planner.listed() == {0: 3, 1: 3, 2: 3, 3: 1, 4: 0}


def test_rerun_lists_from_where_the_done_shards_ended(tmp_path: Path, opened: list[str]):
    raw, pattern = _tars(tmp_path, 12, 4)
    out = tmp_path / "out"
    run(_config(out, pattern, 2, 4), engine="local", progress=False)
    assert [load_json(out / "manifests" / f"00000{s}.json")["source_end"] for s in (0, 1)] == [[1, 0], [2, 0]]
    expected = [r.key for r in list_items(SourceConfig(kind="tars", path=pattern), 12)[8:]]
    # the first tars' items are all in done shards: a rerun with one more shard never opens them
    for t in (0, 1):
        (raw / f"{t:05d}.tar").write_bytes(b"no longer a tar")
    opened.clear()
    summary = run(_config(out, pattern, 3, 4), engine="local", progress=False)
    assert summary.shards_skipped == [0, 1] and summary.shards_written == [2]
    assert set(opened) == {"00002.tar"}
    _, samples = read_shard(out / "shards" / "000002.tar")
    manifest = load_json(out / "manifests" / "000002.json")
    assert sorted(samples) == sorted(manifest["keys"]) and sorted(manifest["keys"] + [r["key"] for r in manifest["rejected"]]) == sorted(expected)
    assert validate_dataset(out).ok()


def test_rerun_without_recorded_positions_lists_through_done_shards(tmp_path: Path, opened: list[str]):
    """A manifest written before positions were recorded: the listing goes through its items."""
    raw, pattern = _tars(tmp_path, 12, 4)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run(_config(out, pattern, 2, 4), engine="local", progress=False)
    mpath = out / "manifests" / "000001.json"
    manifest = load_json(mpath)
    del manifest["source_end"]
    mpath.write_text(json.dumps(manifest))
    (raw / "00000.tar").write_bytes(b"no longer a tar")  # shard 0's end is known: tar 0 is never read
    opened.clear()
    run(_config(out, pattern, 3, 4), engine="local", progress=False)
    assert set(opened) == {"00001.tar", "00002.tar"}
    (raw / "00000.tar").unlink()
    write_img2dataset_tars(raw, 12, per_tar=4, size=48)  # the same tar again
    run(_config(fresh, pattern, 3, 4), engine="local", progress=False)
    assert (out / "shards" / "000002.tar").read_bytes() == (fresh / "shards" / "000002.tar").read_bytes()


def test_first_shard_is_written_before_the_last_tar_is_listed(tmp_path: Path, monkeypatch, opened: list[str]):
    _, pattern = _tars(tmp_path, 12, 4)
    events: list[str] = opened  # tar names as they are opened, "shard N" as shards are written
    real = runner.write_shard

    def recording(out, shard, *args, **kwargs):
        events.append(f"shard {shard}")
        return real(out, shard, *args, **kwargs)

    monkeypatch.setattr(runner, "write_shard", recording)
    run(_config(tmp_path / "out", pattern, 3, 4), engine="local", progress=False)
    assert events.index("shard 0") < events.index("00002.tar")
    assert events[-1] == "shard 2"


def test_short_source_warning_counts_done_shards(tmp_path: Path, caplog):
    _, pattern = _tars(tmp_path, 10, 4)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="datagen"):
        run(_config(out, pattern, 5, 4), engine="local", progress=False)
        assert "source has 10 items: 3 shard(s) instead of 5" in caplog.text
        caplog.clear()
        summary = run(_config(out, pattern, 5, 4), engine="local", progress=False)  # nothing left to do
        assert "source has 10 items: 3 shard(s) instead of 5" in caplog.text
    assert summary.shards_skipped == [0, 1, 2] and not summary.shards_written
    assert [e["shard"] for e in load_json(out / "manifest.json")["shards"]] == [0, 1, 2]


def test_ray_engine_reads_shards_from_the_planner(tmp_path: Path, ray_local):
    """Through Ray Data: the same shards as the loop; a rerun skips the done shards' tars there too."""
    raw, pattern = _tars(tmp_path, 12, 4)
    run(_config(tmp_path / "local", pattern, 3, 4), engine="local", progress=False)
    run(_config(tmp_path / "ray", pattern, 2, 4), engine="ray", progress=False)
    for t in (0, 1):  # listed from where shard 1 ended: never opened
        (raw / f"{t:05d}.tar").write_bytes(b"no longer a tar")
    summary = run(_config(tmp_path / "ray", pattern, 3, 4), engine="ray", progress=False)
    assert summary.shards_skipped == [0, 1] and summary.shards_written == [2]
    for s in range(3):
        name = f"shards/{s:06d}.tar"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert validate_dataset(tmp_path / "ray").ok()


def test_ray_engine_streams_a_long_run_in_windows(tmp_path: Path, ray_local, monkeypatch, opened):
    """A window holds whole shards, the next is listed only when the last is done, and the
    shards come out as the loop writes them."""
    raw, pattern = _tars(tmp_path, 12, 4)
    run(_config(tmp_path / "local", pattern, 3, 4), engine="local", progress=False)
    monkeypatch.setattr(runner, "RAY_WINDOW_ITEMS", 5)  # whole shards: windows of 4 items
    listed = []
    real = runner._stages_dataset
    monkeypatch.setattr(runner, "_stages_dataset", lambda cfg, records: listed.append(
        (len(records), list(opened))) or real(cfg, records))
    summary = run(_config(tmp_path / "ray", pattern, 3, 4), engine="ray", progress=False)
    assert summary.shards_written == [0, 1, 2]
    assert [n for n, _ in listed] == [4, 4, 4]
    assert [names[-1] for _, names in listed] == ["00000.tar", "00001.tar", "00002.tar"]
    for s in range(3):
        name = f"shards/{s:06d}.tar"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
