"""``python -m datagen``: build layered shards (run), list backends, build tiny weights."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datagen.config import ConfigError, load_config


def _source_overrides(source: str | None, source_path: str | None) -> tuple[str | None, str | None]:
    """SOURCE may be a kind (demo, folder, tars, synthetic-gt) or directly a folder / tar pattern."""
    if source is None or source in ("demo", "folder", "tars", "synthetic-gt"):
        return source, source_path
    if source.endswith((".tar", ".tar.gz", ".tgz")) or "{" in source:
        return "tars", source
    if Path(source).is_dir() or "://" in source:  # a local folder, or a folder URL (s3://bucket/raw)
        return "folder", source
    raise ConfigError(f"--source: {source!r} is not a kind (demo, folder, tars, synthetic-gt), "
                      "a folder or a tar pattern")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="build the shards of a pipeline (skips complete ones)")
    run_p.add_argument("--config", "--pipeline", dest="config", default="pipelines/default.yaml",
                       help="pipeline YAML (default: pipelines/default.yaml)")
    run_p.add_argument("--shards", type=int, help="number of shards (overrides the YAML)")
    run_p.add_argument("--source", help="demo | folder | tars | synthetic-gt | a folder | a tar pattern")
    run_p.add_argument("--source-path", help="folder or tar pattern for --source folder|tars")
    run_p.add_argument("--out", help="output folder (default: data)")
    run_p.add_argument("--samples-per-shard", type=int)
    run_p.add_argument("--engine", choices=("auto", "ray", "local"), default="auto",
                       help="auto (default): the in-process loop for small runs on one machine, else Ray; "
                            "ray: Ray Data actor pools; local: in-process loop")
    run_p.add_argument("--verify", action="store_true",
                       help="re-hash complete shards instead of trusting their recorded size and mtime")
    run_p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    run_p.add_argument("--no-progress", action="store_true")
    backends_p = sub.add_parser("backends", help="list the registered stage backends")
    backends_p.add_argument("--params", action="store_true", help="also list each backend's params and defaults")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.command == "backends":
            import dataclasses

            from datagen.registry import backends, get_backend

            for stage, names in backends().items():
                print(f"{stage:9s} {', '.join(names)}")
                for name in names if args.params else ():
                    cls = get_backend(stage, name)
                    print(f"  {name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
                    for f in dataclasses.fields(cls.Params):
                        default = f.default if f.default is not dataclasses.MISSING else (
                            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
                        print(f"      {f.name} = {default!r}")
            return 0
        kind, path = _source_overrides(args.source, args.source_path)
        overrides = {"shards": args.shards, "output": args.out, "source_kind": kind, "source_path": path,
                     "samples_per_shard": args.samples_per_shard}
        cfg = load_config(args.config, overrides)
        if args.ray_address:
            cfg.ray.address = args.ray_address
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from datagen.runner import PipelineError, run

    try:
        summary = run(cfg, engine=args.engine, progress=not args.no_progress, verify=args.verify)
    except (PipelineError, OSError) as err:
        print(f"run stopped: {err}\n(complete shards are kept; fix the cause and rerun to finish)", file=sys.stderr)
        return 1
    print(summary.report())
    print(f"inspect: python -m manifests summary {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
