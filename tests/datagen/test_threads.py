"""An actor's thread pools follow its CPU share (oversubscription is the usual slowdown)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every pool is one thread anyway")
def test_limit_threads_caps_opencv_and_numba() -> None:
    code = ("from datagen.stages.base import limit_threads\n"
            "limit_threads(1.5)\n"
            "import cv2, numba\n"
            "from datagen.alpha import foreground_colours\n"  # pymatting's parallel kernels
            "print(cv2.getNumThreads(), numba.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["1", "1"]
