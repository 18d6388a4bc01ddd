"""The OpenAPI schemas of the backup component's answers: a backup (its manifest), a list of them, and the
statistics document. Generated from the same pydantic model the manifests are parsed with, so the document
cannot drift from what the API sends."""

from __future__ import annotations

from typing import Any, Final

from kybdr_agent.backup.manifest import Manifest

SCHEMAS: Final = "#/components/schemas/"  # where OpenAPI 3.1 keeps named schemas
_PERCENTILES: Final = {
    "oneOf": [
        {"type": "null"},
        {
            "type": "object",
            "properties": {k: {"type": "number"} for k in ("p50", "p90", "p99", "max", "mean")},
            "required": ["p50", "p90", "p99", "max", "mean"],
        },
    ]
}


_COUNTS: Final = {"type": "object", "additionalProperties": {"type": "integer"}}
_NULLABLE_STRING: Final = {"type": ["string", "null"]}
_CONTENTS: Final = {
    "type": "object",
    "properties": {
        "backup_id": {"type": "string"},
        "database": {"type": "string"},
        "archive": {
            "type": "object",
            "properties": {
                k: {"type": "string"} for k in ("format", "version", "pg_dump_version", "server_version", "compression")
            },
        },
        "size_unit": {"type": "string", "enum": ["bytes", "compressed bytes"]},
        "schemas": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "owner": _NULLABLE_STRING,
                    "tables": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "owner": _NULLABLE_STRING,
                                "data_bytes": {"type": "integer"},
                                "rows": {"type": ["integer", "null"]},
                            },
                            "required": ["name", "owner", "data_bytes", "rows"],
                        },
                    },
                    "objects": _COUNTS,
                    "data_bytes": {"type": "integer"},
                },
                "required": ["name", "owner", "tables", "objects", "data_bytes"],
            },
        },
        "other_objects": _COUNTS,
        "large_objects": {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "data_bytes": {"type": "integer"}},
        },
        "totals": {"type": "object"},
    },
    "required": [
        "backup_id",
        "database",
        "archive",
        "size_unit",
        "schemas",
        "other_objects",
        "large_objects",
        "totals",
    ],
}


def backup_schemas() -> dict[str, Any]:
    manifest = Manifest.model_json_schema(mode="serialization", ref_template=SCHEMAS + "{model}")
    defs = manifest.pop("$defs", {})
    manifest["properties"]["part_count"] = {"type": "integer", "description": "multipart parts of the object"}
    manifest["required"] = [*manifest.get("required", []), "part_count"]
    manifest["properties"]["locations"] = {
        "type": "array",
        "items": {"type": "string", "enum": ["primary", "dr"]},
        "description": "the regions whose repository holds this backup (listing and show only)",
    }
    manifest["properties"]["notices"] = {"type": "array", "items": {"type": "string"}}
    return {
        **defs,
        "Backup": manifest,
        "BackupList": {
            "type": "object",
            "properties": {
                "backups": {"type": "array", "items": {"$ref": SCHEMAS + "Backup"}},
                "unreadable": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"key": {"type": "string"}, "problem": {"type": "string"}},
                        "required": ["key", "problem"],
                    },
                },
                "regions": {
                    "type": "object",
                    "description": "each configured region's repository, and whether it could be read",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string"},
                            "reachable": {"type": "boolean"},
                            "error": {"type": "string"},
                        },
                        "required": ["location", "reachable"],
                    },
                },
                "notices": {"type": "array", "items": {"type": "string"}},
                "recovery_windows": {
                    "type": "array",
                    "description": "per cluster with a physical backup: earliest_recovery_time, latest_recovery_time, "
                    "intervals, gaps, problems (wal.window_report.window_document); error when its archive "
                    "could not be read",
                    "items": {"type": "object"},
                },
            },
            "required": ["backups", "unreadable", "regions", "notices"],
        },
        "Contents": _CONTENTS,
        "Stats": {
            "type": "object",
            "properties": {
                "generated_at": {"type": "string"},
                "backups": {
                    "type": "object",
                    "properties": {k: {"type": "integer"} for k in ("count", "stored_bytes", "dump_bytes")},
                    "required": ["count", "stored_bytes", "dump_bytes"],
                },
                "by_outcome": {
                    "type": "object",
                    "properties": {k: {"type": "integer"} for k in ("succeeded", "failed", "cancelled")},
                    "required": ["succeeded", "failed", "cancelled"],
                },
                "success_rate": {"type": ["number", "null"]},
                "duration_seconds": _PERCENTILES,
                "stored_bytes": _PERCENTILES,
                "databases": {"type": "object", "additionalProperties": {"type": "object"}},
                "last_failure": {"type": ["object", "null"]},
                "last_drill": {"type": ["object", "null"]},
                "unreadable_manifests": {"type": "integer"},
            },
            "required": [
                "generated_at",
                "backups",
                "by_outcome",
                "success_rate",
                "duration_seconds",
                "stored_bytes",
                "databases",
                "last_failure",
                "last_drill",
                "unreadable_manifests",
            ],
        },
    }
