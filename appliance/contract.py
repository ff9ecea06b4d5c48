"""The contract's facts, each written once: the case-record schema and the image formats.

Validation (`validate_record`) and the OpenAPI document (`api/openapi.py`)
are both generated from `CASE_FIELDS`, so the two cannot drift. It imports
only the error tree: every layer may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import BadRequest, UnprocessableEntity

Schema = dict[str, Any]


@dataclass(frozen=True)
class ImageFormat:
    """One accepted image type: its name (as `imaging.sniff` says it), file suffix and media type."""

    name: str
    suffix: str
    content_type: str
    label: str  # as a person writes it, in error messages


IMAGE_FORMATS: dict[str, ImageFormat] = {
    fmt.name: fmt
    for fmt in (
        ImageFormat("jpeg", ".jpg", "image/jpeg", "JPEG"),
        ImageFormat("png", ".png", "image/png", "PNG"),
        ImageFormat("webp", ".webp", "image/webp", "WebP"),
    )
}
ACCEPTED_FORMATS = tuple(IMAGE_FORMATS)
IMAGE_SUFFIXES = tuple(fmt.suffix for fmt in IMAGE_FORMATS.values())
SUFFIXES = {name: fmt.suffix for name, fmt in IMAGE_FORMATS.items()}


# Case ids are decimal numbers as the counter writes them: one spelling per id
# ("010000" would otherwise be a second case 10000), and at most 18 digits so
# they fit the stores' 64-bit counters.
CASE_ID_PATTERN = "^(0|[1-9][0-9]{0,17})$"
_CASE_ID = re.compile(CASE_ID_PATTERN)
CASE_ID_SCHEMA: Schema = {"type": "string", "pattern": CASE_ID_PATTERN}


def is_case_id(value: str) -> bool:
    """A case id as the counter writes it: digits, no leading zero, at most 18."""
    return value.isascii() and _CASE_ID.fullmatch(value) is not None


def sanitize_user_id(raw: str) -> str:
    """Trim, then keep only letters, digits, '-' and '_' (the contract's X-User-Id rule)."""
    return "".join(c for c in raw.strip() if (c.isascii() and c.isalnum()) or c in "-_")[:128]


# A header that keeps at least one character under that rule (JSON Schema patterns are unanchored).
USER_ID_PATTERN = "[A-Za-z0-9_-]"


def case_id_text(value: Any) -> Any:
    """A case id given as a whole number (10000, or 10000.0 as JSON may spell it) as its text; else `value`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if _is_number(value):
        return str(value)  # 10000.5 names no case: refused as such
    return value


# How a field's value is checked, and what OpenAPI says about it. Every kind but
# the id also takes null: the old app sends nulls for fields the clinician left empty.
Kind = Literal["text", "timestamp", "number", "predictions", "text_list", "case_id"]


@dataclass(frozen=True)
class Field:
    """One field of a case record: its kind and what the document says of it."""

    kind: Kind
    description: str = ""

    def schema(self) -> Schema:
        """The field's JSON Schema (null always allowed)."""
        schema: Schema = dict(_SCHEMAS[self.kind])
        if self.description:
            schema["description"] = self.description
        return schema

    def check(self, key: str, value: Any) -> Any:
        """`value` as stored (numbers given for text kept as text), or the error the contract names."""
        if value is None:
            return None
        if self.kind == "case_id":
            value = case_id_text(value)
            if not isinstance(value, str):
                raise UnprocessableEntity(f"Field '{key}' must be a string")
            if not is_case_id(value):
                raise BadRequest("Invalid case_id")
            return value
        if self.kind == "text":
            if _is_number(value):  # the old server's pydantic kept a number sent for text as its text
                return str(value)
            if not isinstance(value, str):
                raise UnprocessableEntity(f"Field '{key}' must be a string")
            return value
        if self.kind == "timestamp":
            if not isinstance(value, str):
                raise UnprocessableEntity(f"Field '{key}' must be a string")
            return value
        if self.kind == "number":
            if not _is_number(value):
                raise UnprocessableEntity(f"Field '{key}' must be a number")
            return value
        if not isinstance(value, list):
            raise UnprocessableEntity(f"Field '{key}' must be a list")
        if self.kind == "text_list" and not all(isinstance(v, str) for v in value):
            raise UnprocessableEntity(f"Field '{key}' must be a list of strings")
        if self.kind == "predictions" and not all(_is_prediction(v) for v in value):
            raise UnprocessableEntity(f"Field '{key}' must be a list of {{label, confidence}} objects")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_prediction(value: Any) -> bool:
    # Lenient on purpose: the app echoes /check-image's predictions, and a case
    # record it cannot log is a clinical decision lost. Only wrong types are refused.
    return (isinstance(value, dict) and isinstance(value.get("label", ""), str)
            and _is_number(value.get("confidence", 0)))


# A prediction as a client sends it back (the answers of /check-image always have both keys).
PREDICTION_SCHEMA: Schema = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "confidence": {"type": "number"}},
}
_SCHEMAS: dict[Kind, Schema] = {
    "text": {"type": ["string", "number", "null"]},
    "timestamp": {"type": ["string", "null"]},
    "number": {"type": ["number", "null"]},
    "predictions": {"type": ["array", "null"], "items": PREDICTION_SCHEMA},
    "text_list": {"type": ["array", "null"], "items": {"type": "string"}},
    "case_id": {"anyOf": [CASE_ID_SCHEMA, {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}]},
}

# The case record's fields as the phone app sends them (CLIENT_CONTRACT.md).
CASE_FIELDS: dict[str, Field] = {
    "case_id": Field("case_id"),
    "image_id": Field("text"),
    "blur_score": Field("number"),
    "predictions": Field("predictions"),
    "device": Field("text"),
    "notes": Field("text"),
    "status": Field("text", 'the app sends "Confirmed" or "pending" (the default)'),
    "gender": Field("text"),
    "age": Field("text", "a string; a number is kept as its text"),
    "location": Field("text"),
    "symptoms": Field("text_list"),
    "image_paths": Field("text_list"),
    "created_at": Field("timestamp", "ISO 8601; the appliance sets it when absent"),
}
REJECT_FIELDS: dict[str, Field] = {k: CASE_FIELDS[k] for k in (
    "case_id", "notes", "predictions", "image_id", "gender", "age", "location", "symptoms", "image_paths", "created_at",
)} | {"reason": Field("text")}
# What `PUT /cases/{case_id}` may change: the case's fields but its id.
UPDATE_FIELDS: dict[str, Field] = {k: v for k, v in CASE_FIELDS.items() if k != "case_id"}
# Set by the appliance, never taken from a client's body.
SERVER_FIELDS = ("entry_type", "user_id", "user_role", "image_ids", "updated_at")


def validate_fields(body: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """Check the known fields (numbers given for text become text); other keys are kept as given.

    The app sends keys of its own (e.g. `image_decisions`); the ones the
    appliance sets itself are dropped.
    """
    record: dict[str, Any] = {}
    for key, value in body.items():
        if key in SERVER_FIELDS:
            continue
        field = fields.get(key)
        record[key] = value if field is None else field.check(key, value)
    return record


def record_schema(fields: dict[str, Field], required: tuple[str, ...] = ()) -> Schema:
    """The JSON Schema of a record of `fields` (unknown keys allowed, as the contract says)."""
    return {
        "type": "object",
        "properties": {key: field.schema() for key, field in fields.items()},
        "required": list(required),
        "additionalProperties": True,
    }
