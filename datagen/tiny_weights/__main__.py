"""``python -m datagen.tiny_weights OUT``: build every tiny checkpoint under OUT (``make tiny-weights``).

Layout (what ``pipelines/tiny.yaml`` expects)::

    OUT/sam/sam_tiny.pth
    OUT/groundingdino/{groundingdino_tiny.pth, GroundingDINO_tiny.py, bert-tiny-uncased/}
    OUT/blip2/{blip2-tiny/, instructblip-tiny/}
    OUT/sd-inpaint/sd-inpaint-tiny/
    OUT/lavis/lavis-blip2-opt-tiny/      (only with --lavis-python: built inside the LAVIS environment)
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

PARTS = {"sam": "sam", "groundingdino": "groundingdino", "blip2": "blip2", "sd-inpaint": "sd_inpaint"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="build only these")
    parser.add_argument("--lavis-python", help="the LAVIS environment's python (builds OUT/lavis)")
    args = parser.parse_args(argv)
    for folder, module in PARTS.items():
        if args.only and folder not in args.only:
            continue
        built = importlib.import_module(f"datagen.tiny_weights.{module}").build(args.out / folder)
        for role, path in built.items():
            print(f"{folder:14s} {role:13s} {path}")
    if args.lavis_python:
        subprocess.run([args.lavis_python, "-m", "datagen.tiny_weights.lavis", str(args.out / "lavis")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
