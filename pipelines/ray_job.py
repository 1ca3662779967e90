"""Ray job entry point: build a dataset on the cluster this job runs on.

Submitted from a checkout (the working dir is shipped to the cluster)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.ray_job --config pipelines/default.yaml --shards 8 --out /shared/data

OUT must be a path every node and the driver can write (shared storage): the job runs in a
temporary copy of the working dir, so a relative OUT would vanish with it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from datagen.__main__ import main


def entry(argv: list[str]) -> int:
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
        if not Path(out).is_absolute():
            print(f"ray_job: --out {out!r} must be absolute (shared storage); the job's working dir is "
                  "temporary", file=sys.stderr)
            return 2
    os.environ.setdefault("RAY_ADDRESS", "auto")  # connect to the cluster that runs this job
    return main(["run", *argv])


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
