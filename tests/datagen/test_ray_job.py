"""`ray job submit` against a real local head node, as on a cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datagen.helpers import ROOT, load_json, read_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_to_local_head(tmp_path: Path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    gcs, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-job-test-{os.getpid()}"  # Ray wants a short socket path
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                    "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--temp-dir", str(temp), "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    out = tmp_path / "job-out"
    try:
        proc = subprocess.run(
            [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
             "python", "-m", "pipelines.ray_job", "--config", "pipelines/synthetic-gt.yaml", "--shards", "2",
             "--samples-per-shard", "4", "--out", str(out), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
    index = load_json(out / "manifest.json")
    assert index["totals"]["samples"] == 8
    _, samples = read_shard(out / "shards" / "000001.tar")
    assert list(samples) == [f"gt-scene-{i:06d}" for i in range(4, 8)]


def test_ray_job_entry_refuses_relative_out():
    from pipelines.ray_job import entry

    assert entry(["--out", "relative/data"]) == 2
