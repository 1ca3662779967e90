"""Tools for LayerDiff datasets (formats 1 and 2, docs/FORMAT.md): JSON Schemas, summary,
validation, contact-sheet previews, the format-1 to format-2 upgrade. ``python -m manifests --help`` for the CLI."""

from manifests.layout import scan_dataset, shard_done
from manifests.preview import contact_sheet, select_samples, sheet_size, write_preview
from manifests.schemas import DocumentError, document_errors, validate_document
from manifests.summary import format_summary, normalize_reason, summarize
from manifests.validate import Report, Violation, validate_dataset, validate_shard

__all__ = [
    "DocumentError", "Report", "Violation", "contact_sheet", "document_errors", "format_summary",
    "normalize_reason", "scan_dataset", "select_samples", "shard_done", "sheet_size", "summarize",
    "validate_dataset", "validate_document", "validate_shard", "write_preview",
]
