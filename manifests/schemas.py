"""The JSON Schemas (draft 2020-12) of the three format-1 documents, and their validation.

``sample`` is a sample's KEY.json, ``shard`` a shard manifest (manifests/NNNNNN.json) and
``dataset`` the dataset index (manifest.json). The schema files live in ``manifests/schemas/``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
KINDS: dict[str, str] = {
    "sample": "sample.schema.json",
    "shard": "shard.schema.json",
    "dataset": "dataset.schema.json",
}


class DocumentError(ValueError):
    """A document breaks its schema; ``errors`` lists every violation as ``$.path: message``."""

    def __init__(self, kind: str, errors: list[str]) -> None:
        self.kind = kind
        self.errors = errors
        super().__init__(f"invalid {kind} document: " + "; ".join(errors))


@cache
def load_schema(kind: str) -> dict[str, Any]:
    """The schema of ``kind`` (one of :data:`KINDS`) as a dict."""
    if kind not in KINDS:
        raise KeyError(f"unknown document kind {kind!r}; kinds are {sorted(KINDS)}")
    with open(SCHEMA_DIR / KINDS[kind], encoding="utf-8") as f:
        return json.load(f)


@cache
def validator(kind: str) -> Draft202012Validator:
    """A (cached) validator for ``kind``; checks the schema itself once."""
    schema = load_schema(kind)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def document_errors(doc: Any, kind: str) -> list[str]:
    """Every schema violation of ``doc`` as ``$.json.path: message`` (empty when valid)."""
    out = []
    for err in sorted(validator(kind).iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        message = err.message
        if len(message) > 160:  # jsonschema quotes the whole instance; keep messages one line
            message = f"{_short(err.instance)} fails {err.validator!r} {_short(err.validator_value)}"
        out.append(f"{err.json_path}: {message}")
    return out


def validate_document(doc: Any, kind: str) -> None:
    """Raise :class:`DocumentError` (listing each violation with its JSON path) unless ``doc``
    is a valid ``kind`` document: ``"sample"``, ``"shard"`` or ``"dataset"``."""
    errors = document_errors(doc, kind)
    if errors:
        raise DocumentError(kind, errors)
