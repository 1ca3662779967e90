"""The JSON Schemas (draft 2020-12) of the three format documents, and their validation.

``sample`` is a sample's KEY.json, ``shard`` a shard manifest (manifests/NNNNNN.json) and
``dataset`` the dataset index (manifest.json). The schema files live in
``manifests/schemas/vN/`` for each format version N; a document is checked against the version its
``schema`` key names, and a version nobody knows is an error of its own.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from datagen.format import FORMAT_VERSION, FormatError, schema_version

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
def load_schema(kind: str, version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The schema of ``kind`` (one of :data:`KINDS`) in format ``version``, as a dict."""
    if kind not in KINDS:
        raise KeyError(f"unknown document kind {kind!r}; kinds are {sorted(KINDS)}")
    with open(SCHEMA_DIR / f"v{version}" / KINDS[kind], encoding="utf-8") as f:
        return json.load(f)


@cache
def validator(kind: str, version: int = FORMAT_VERSION) -> Draft202012Validator:
    """A (cached) validator for ``kind`` in ``version``; checks the schema itself once."""
    schema = load_schema(kind, version)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def document_errors(doc: Any, kind: str) -> list[str]:
    """Every schema violation of ``doc`` as ``$.json.path: message`` (empty when valid), against
    the schema of the format version ``doc["schema"]`` names."""
    if kind not in KINDS:
        raise KeyError(f"unknown document kind {kind!r}; kinds are {sorted(KINDS)}")
    if not isinstance(doc, dict):
        return [f"$: {_short(doc)} is not of type 'object'"]
    try:
        version = schema_version(doc.get("schema"), kind)
    except FormatError as err:
        return [f"$.schema: {err.detail}"]
    out = []
    for err in sorted(validator(kind, version).iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
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
