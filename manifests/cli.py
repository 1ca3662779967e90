"""``python -m manifests``: summary, validate, preview, export, upgrade and a browser (serve) of a LayerDiff dataset."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_VIOLATIONS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m manifests",
        description="Inspect a LayerDiff dataset directory (OUT/shards, OUT/manifests, OUT/manifest.json).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="totals, layer histogram, rejections, stage backends, shards")
    p.add_argument("out", type=Path, help="dataset directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--reasons", type=int, default=20, help="rejection reasons to list (default 20)")

    p = sub.add_parser("validate", help="re-read every shard against its manifest and the format")
    p.add_argument("out", type=Path, help="dataset directory")
    p.add_argument("--max-layers", type=int, default=None,
                   help="layer limit per sample (default: max_layers from the index's config)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="check shards in N processes")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("preview", help="contact sheet PNG: one row per sample")
    p.add_argument("out", type=Path, help="dataset directory")
    p.add_argument("--key", action="append", default=[], help="sample key (repeatable)")
    p.add_argument("--shard", type=int, default=None, help="take samples from this shard")
    p.add_argument("-n", type=int, default=8, help="number of samples without --key (default 8)")
    p.add_argument("--cell", type=int, default=128, help="cell size in pixels (default 128)")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")

    p = sub.add_parser("upgrade", help="rewrite a format-1 dataset as format 2, shard by shard (rerun-safe)")
    p.add_argument("out", type=Path, help="dataset directory")
    p = sub.add_parser("export", help="per sample: RGBA PNG per layer, layers.ora and layers.psd")
    p.add_argument("out", type=Path, help="dataset directory")
    p.add_argument("dest", type=Path, help="folder to write DEST/KEY/ into")
    p.add_argument("--key", action="append", default=[], help="sample key (repeatable)")
    p.add_argument("--shard", type=int, default=None, help="take samples from this shard")
    p.add_argument("-n", type=int, default=8, help="number of samples without --key (default 8)")
    p = sub.add_parser("serve", help="browse the dataset in a web browser (read-only, local)")
    p.add_argument("out", type=Path, help="dataset directory")
    p.add_argument("--run", type=Path, default=None, help="a training run folder to show too (runs/NAME)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else exposes the data to the network)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the shard indexes are cached (default ~/.cache/layerdiff/browse; never in OUT)")
    p.add_argument("--no-cache", action="store_true", help="keep the shard indexes in memory only")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def _summary(args: argparse.Namespace) -> int:
    from manifests.summary import format_summary, summarize

    if not args.out.is_dir():
        print(f"error: {args.out} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    summary = summarize(args.out)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary, max_reasons=args.reasons))
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from manifests.validate import validate_dataset

    report = validate_dataset(args.out, max_layers=args.max_layers, jobs=max(1, args.jobs),
                              progress=not args.quiet and not args.json)
    ok = report.ok(strict=args.strict)
    if args.json:
        doc = report.to_dict()
        doc["ok"] = ok
        print(json.dumps(doc, indent=2))
    else:
        for v in report.violations:
            print(v)
        verdict = "OK" if ok else "FAILED"
        print(f"{verdict}: {report.shards} shards, {report.samples} samples, "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    return EXIT_OK if ok else EXIT_VIOLATIONS


def _preview(args: argparse.Namespace) -> int:
    from manifests.preview import write_preview

    try:
        rows, (width, height) = write_preview(args.out, args.output, keys=args.key, shard=args.shard,
                                              n=args.n, cell=args.cell)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.output} ({rows} samples, {width}x{height})")
    return EXIT_OK


def _upgrade(args: argparse.Namespace) -> int:
    from manifests.upgrade import UpgradeError, upgrade_dataset

    try:
        report = upgrade_dataset(args.out, log=print)
    except UpgradeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_VIOLATIONS
    print(f"OK: {len(report.upgraded)} shards upgraded, {len(report.finished)} finished, "
          f"{len(report.kept)} already format 2; {report.samples} samples rewritten")
    return 0


def export_dataset(out: Path, dest: Path, keys: Sequence[str] = (), shard: int | None = None,
                   n: int = 8) -> list[Path]:
    """Export the selected samples of ``out`` (as ``preview`` selects them) to ``dest/KEY/`` with
    :func:`datagen.export.export_sample`, layers named by their captions; returns the folders."""
    from datagen.export import export_sample
    from manifests.preview import select_samples

    folders = []
    for item in select_samples(out, keys, shard, n):
        s = item.sample
        layers = s.meta.get("layers", [])
        names = [str((s.meta.get("background") or {}).get("caption") or "background")]
        names += [str(layers[k].get("caption") or layers[k].get("phrase") or "") if k < len(layers) else ""
                  for k in range(s.num_layers)]
        folders.append(export_sample(dest / s.key, s.background, s.foregrounds, s.masks, names))
    return folders


def _export(args: argparse.Namespace) -> int:
    try:
        folders = export_dataset(args.out, args.dest, keys=args.key, shard=args.shard, n=args.n)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return EXIT_USAGE
    if not folders:
        print(f"error: no samples to export in {args.out}", file=sys.stderr)
        return EXIT_USAGE
    for folder in folders:
        print(folder)
    print(f"exported {len(folders)} samples to {args.dest}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from manifests.serve import serve
    from manifests.shardindex import default_cache_dir

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the dataset is readable from the network", file=sys.stderr)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    try:
        serve(args.out, run=args.run, host=args.host, port=args.port, cache_dir=cache, verbose=args.verbose)
    except (FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 violations found or upgrade failed, 2 usage error)."""
    args = _parser().parse_args(argv)
    return {"summary": _summary, "validate": _validate, "preview": _preview,
            "upgrade": _upgrade,
            "export": _export,
            "serve": _serve}[args.command](args)
