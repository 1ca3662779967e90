"""What a dataset holds, from its manifests alone (``python -m manifests summary``).

Reads the shard manifests (never the tars), so it is cheap and works while a run is still
writing shards: the index (manifest.json) is reported when present but not required.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from manifests.layout import read_json, scan_dataset, shard_name

_NORMALISERS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\s*\([\w.\-]+\.py:\d+\)\s*$"), ""),  # "(file.py:123)" appended by the stages
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"(?:[A-Za-z]:)?(?:[\w.\-~]*/)+[\w.\-]*"), "<path>"),
    (re.compile(r"\b(?:0x)?[0-9a-fA-F]{8,}\b"), "<hex>"),
    (re.compile(r"(?<![A-Za-z_])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
]
REASON_LIMIT = 120


def normalize_reason(reason: str) -> str:
    """Fold the variable parts of a rejection reason (numbers, quoted strings, paths, hashes,
    source locations) into placeholders so that equal causes count together."""
    text = str(reason)
    for pattern, repl in _NORMALISERS:
        text = pattern.sub(repl, text)
    text = text.strip()
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def _as(value: Any, kind: type) -> Any:
    """``value`` if it is a ``kind`` (list or dict), else an empty one: manifests may be damaged."""
    return value if isinstance(value, kind) else kind()


def _checkpoint_text(checkpoint: Any) -> str | None:
    if isinstance(checkpoint, dict):
        return f"{checkpoint.get('name')} sha256:{str(checkpoint.get('sha256'))[:12]}"
    return None if checkpoint is None else str(checkpoint)


def summarize(out: str | Path) -> dict[str, Any]:
    """Totals, layer histogram, rejections, stage identities and per-shard rows of a dataset."""
    files = scan_dataset(out)
    shards: list[dict[str, Any]] = []
    problems: list[str] = []
    layers: Counter[int] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], str] = {}
    by_stage: Counter[str] = Counter()
    stages: dict[str, Counter[tuple[Any, ...]]] = {}
    configs: Counter[str] = Counter()
    for number, path in sorted(files.manifests.items()):
        try:
            doc = read_json(path)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            problems.append(f"shard {shard_name(number)}: manifest unreadable: {err}")
            continue
        rejected = [r for r in _as(doc.get("rejected"), list) if isinstance(r, dict)]
        hist = {int(k): v for k, v in _as(doc.get("layers"), dict).items()
                if str(k).isdigit() and isinstance(v, int)}
        layers.update(hist)
        for item in rejected:
            stage, reason = str(item.get("stage")), str(item.get("reason", ""))
            norm = (stage, normalize_reason(reason))
            reasons[norm] += 1
            examples.setdefault(norm, reason)
            by_stage[stage] += 1
        for stage, ident in _as(doc.get("stages"), dict).items():
            if isinstance(ident, dict):
                row = (ident.get("backend"), ident.get("model"),
                       _checkpoint_text(ident.get("checkpoint")), ident.get("version"), ident.get("licence"))
                stages.setdefault(stage, Counter())[row] += 1
        configs[str(doc.get("config_sha256"))] += 1
        samples = doc.get("samples") if isinstance(doc.get("samples"), int) else 0
        shards.append({
            "shard": number, "samples": samples, "rejected": len(rejected),
            "bytes": doc.get("bytes") if isinstance(doc.get("bytes"), int) else 0,
            "layers": {str(k): v for k, v in sorted(hist.items())},
            "seconds": doc.get("seconds"), "created": doc.get("created"),
        })
    unfinished = sorted(set(files.tars) - set(files.manifests))
    total_samples = sum(s["samples"] for s in shards)
    total_rejected = sum(s["rejected"] for s in shards)
    seconds = sum(s["seconds"] for s in shards if isinstance(s["seconds"], (int, float)))
    num_layers = sum(layers.values())
    index: dict[str, Any] = {"present": files.index.is_file()}
    if index["present"]:
        try:
            doc = read_json(files.index)
            index.update(config_sha256=doc.get("config_sha256"), totals=doc.get("totals"),
                         shards=len(_as(doc.get("shards"), list)))
        except (OSError, ValueError, AttributeError) as err:
            problems.append(f"manifest.json unreadable: {err}")
    return {
        "out": str(Path(out)),
        "totals": {
            "shards": len(shards), "samples": total_samples, "rejected": total_rejected,
            "bytes": sum(s["bytes"] for s in shards), "seconds": round(seconds, 3),
            "acceptance": round(total_samples / (total_samples + total_rejected), 4)
            if total_samples + total_rejected else None,
            "mean_layers": round(sum(k * n for k, n in layers.items()) / num_layers, 3) if num_layers else None,
        },
        "layers": {str(k): n for k, n in sorted(layers.items())},
        "rejections_by_stage": dict(by_stage.most_common()),
        "rejections": [{"stage": s, "reason": r, "count": n, "example": examples[(s, r)]}
                       for (s, r), n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))],
        "stages": {stage: [{"backend": b, "model": m, "checkpoint": c, "version": v, "licence": lic, "shards": n}
                           for (b, m, c, v, lic), n in ids.most_common()]
                   for stage, ids in stages.items()},
        "config_sha256": dict(configs),
        "index": index,
        "unfinished_shards": unfinished,
        "temporary_files": [str(p.relative_to(files.out)) for p in files.temporary],
        "problems": problems,
        "shards": shards,
    }


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_summary(summary: dict[str, Any], max_reasons: int = 20, max_shards: int = 200) -> str:
    """The human-readable report of :func:`summarize`."""
    t = summary["totals"]
    lines = [f"dataset {summary['out']}"]
    acceptance = f"{100 * t['acceptance']:.1f}%" if t["acceptance"] is not None else "-"
    lines.append(f"  shards {t['shards']}  samples {t['samples']}  rejected {t['rejected']}  "
                 f"accepted {acceptance}  size {_size(t['bytes'])}  time {t['seconds']:.1f} s")
    idx = summary["index"]
    if idx["present"]:
        lines.append(f"  index manifest.json: {idx.get('shards')} shards, totals {idx.get('totals')}")
    else:
        lines.append("  index manifest.json: missing (run not finished)")
    if summary["unfinished_shards"]:
        lines.append(f"  unfinished shards (tar, no manifest): "
                     f"{', '.join(shard_name(s) for s in summary['unfinished_shards'])}")
    if len(summary["config_sha256"]) > 1:
        lines.append(f"  WARNING: shards were made with {len(summary['config_sha256'])} different configs")
    lines.append("")
    lines.append(f"layers per sample (mean {t['mean_layers']}):")
    peak = max(summary["layers"].values(), default=0)
    for k, n in summary["layers"].items():
        bar = "#" * (round(40 * n / peak) if peak else 0)
        lines.append(f"  {k:>3}  {n:>8}  {bar}")
    lines.append("")
    lines.append(f"rejections ({t['rejected']}):")
    for stage, n in summary["rejections_by_stage"].items():
        lines.append(f"  {stage:<10} {n:>8}")
    for r in summary["rejections"][:max_reasons]:
        lines.append(f"    {r['count']:>6}  {r['stage']:<10} {r['reason']}")
    if len(summary["rejections"]) > max_reasons:
        lines.append(f"    ... {len(summary['rejections']) - max_reasons} more reasons (--json for all)")
    lines.append("")
    lines.append("stages:")
    for stage, ids in summary["stages"].items():
        mixed = "  MIXED" if len(ids) > 1 else ""
        for i in ids:
            licence = f"  licence={i['licence']}" if i["licence"] else ""
            lines.append(f"  {stage:<10} {i['backend']}  model={i['model']}  checkpoint={i['checkpoint']}{licence}  "
                         f"v{i['version']}  ({i['shards']} shards){mixed}")
    lines.append("")
    lines.append(f"  {'shard':>6}  {'samples':>7}  {'rejected':>8}  {'size':>10}  {'seconds':>8}  layers")
    for s in summary["shards"][:max_shards]:
        secs = f"{s['seconds']:.1f}" if isinstance(s["seconds"], (int, float)) else "-"
        hist = " ".join(f"{k}:{v}" for k, v in s["layers"].items())
        lines.append(f"  {shard_name(s['shard']):>6}  {s['samples']:>7}  {s['rejected']:>8}  "
                     f"{_size(s['bytes']):>10}  {secs:>8}  {hist}")
    if len(summary["shards"]) > max_shards:
        lines.append(f"  ... {len(summary['shards']) - max_shards} more shards (--json for all)")
    if summary["temporary_files"]:
        lines.append(f"temporary files: {', '.join(summary['temporary_files'])}")
    for p in summary["problems"]:
        lines.append(f"PROBLEM {p}")
    return "\n".join(lines)
