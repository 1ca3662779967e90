"""A bad config fails before any work starts and names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from datagen.__main__ import main
from datagen.config import ConfigError, load_config, parse_config


@pytest.mark.parametrize("doc, key", [
    ({"shardz": 2}, "shardz"),
    ({"stages": {"ground": {"backend": "contrast", "params": {"no_such_param": 1}}}}, "stages.ground.params.no_such_param"),
    ({"stages": {"segment": {"backend": "nope"}}}, "stages.segment.backend"),
    ({"stages": {"inpaint": {"actorz": 2}}}, "stages.inpaint.actorz"),
    ({"stages": {"decode": {"batch_size": 0}}}, "stages.decode.batch_size"),
    ({"image": {"size": "big"}}, "image.size"),
    ({"source": {"kind": "ftp"}}, "source.kind"),
    ({"source": {"kind": "folder", "path": "/no/such/folder"}}, "source.path"),
    ({"source": {"kind": "tars"}}, "source.path"),
    ({"output": "${LAYERDIFF_UNSET_VARIABLE}/x"}, "LAYERDIFF_UNSET_VARIABLE"),
])
def test_bad_config_names_the_key(doc, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(doc)


def test_env_variables_are_expanded(monkeypatch):
    monkeypatch.setenv("LAYERDIFF_OUT", "/tmp/somewhere")
    assert parse_config({"output": "${LAYERDIFF_OUT}/data"}).output == "/tmp/somewhere/data"
    assert parse_config({"output": "${LAYERDIFF_NOPE:-fallback}"}).output == "fallback"


def test_config_hash_ignores_run_keys_only():
    a = parse_config({"shards": 2, "output": "a"})
    b = parse_config({"shards": 9, "output": "b"})
    c = parse_config({"samples_per_shard": 7})
    assert a.sha256() == b.sha256() != c.sha256()


def test_missing_pipeline_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_error_without_running(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  ground:\n    backend: contrast\n    params: {box_thresh: 1}\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "stages.ground.params.box_thresh" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_pipelines_are_valid():
    for yaml in sorted(Path("pipelines").glob("*.yaml")):
        if yaml.name in ("gpu.yaml", "tiny.yaml"):
            continue  # they name checkpoints; tested with the model backends
        load_config(yaml)
