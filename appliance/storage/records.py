"""Record rules every back end shares: validation, upsert merging, case take-over, ordering.

Back ends decide where records live; this module decides what they contain, so
the same calls give the same records whichever back end is configured.
"""

from __future__ import annotations

import json
from typing import Any

from . import CASE_ENTRY_TYPES, PATIENT_FIELDS, StoredImage
from .files import check_id, check_suffix

# Keys an update never changes: they say which record this is, or are derived (image_ids).
PROTECTED_KEYS = frozenset({"case_id", "entry_type", "user_id", "image_ids"})
# Entry types `update_case` may touch: a reject is a final answer, never edited.
UPDATABLE_ENTRY_TYPES = ("case", "uncertain")


def dumps(record: dict[str, Any]) -> str:
    """One-line JSON for a record; ValueError if it is not JSON-able."""
    try:
        return json.dumps(record)
    except (TypeError, ValueError) as e:
        raise ValueError(f"record is not JSON-serialisable: {e}") from e


def image_record(image: StoredImage, record: dict[str, Any]) -> dict[str, Any]:
    """Check an image and its record; return a copy with `image_id` and `case_id` as strings."""
    check_id("image_id", image.image_id)
    check_suffix(image.suffix)
    if not isinstance(image.data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image data must be bytes, got {type(image.data).__name__}")
    rec = dict(record)
    if rec.get("image_id", image.image_id) != image.image_id:
        raise ValueError(f"record image_id {rec['image_id']!r} differs from the image's {image.image_id!r}")
    rec["image_id"] = image.image_id
    if rec.get("case_id") is not None:
        rec["case_id"] = str(rec["case_id"])
    return rec


def case_record(record: dict[str, Any]) -> dict[str, Any]:
    """Check a case/uncertain/reject record; return a copy with `case_id` as a string."""
    rec = dict(record)
    if rec.get("entry_type") not in CASE_ENTRY_TYPES:
        raise ValueError(f"entry_type must be one of {', '.join(CASE_ENTRY_TYPES)}; got {rec.get('entry_type')!r}")
    if rec.get("case_id") in (None, ""):
        raise ValueError("case record without case_id")
    rec["case_id"] = str(rec["case_id"])
    return rec


def merge_update(case: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The case record with `fields` merged in; protected keys in `fields` are ignored."""
    merged = dict(case)
    merged.update({k: v for k, v in fields.items() if k not in PROTECTED_KEYS})
    return merged


def is_empty(value: Any) -> bool:
    """None, "" and [] do not overwrite an image record's patient fields."""
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def takeover(case: dict[str, Any]) -> dict[str, Any]:
    """The fields the image records of a case take over from its case record."""
    fields = {
        "case_status": case.get("status"),
        "case_entry_type": case.get("entry_type"),
        "case_updated_at": case.get("updated_at") or case.get("created_at"),
    }
    fields.update({k: case[k] for k in PATIENT_FIELDS if not is_empty(case.get(k))})
    return fields


def status_key(status: Any) -> str:
    """The form statuses are compared in: case-insensitive ("Confirmed" == "confirmed")."""
    return "" if status is None else str(status).casefold()


def created_key(record: dict[str, Any]) -> str:
    """`created_at` as the string that orders records (ISO strings sort by time)."""
    value = record.get("created_at")
    return "" if value is None else str(value)


def listed_entry_types(include_uncertain: bool, include_rejected: bool) -> tuple[str, ...]:
    """Entry types `list_cases` returns for its include flags."""
    return ("case",) + (("uncertain",) if include_uncertain else ()) + (("reject",) if include_rejected else ())


def case_id_forms(case_id: str) -> tuple[str, ...]:
    """The spellings of a digit case id that name the same case ("010004" and "10004")."""
    forms = {case_id}
    if case_id.isdigit():
        forms.add(str(int(case_id)))
    return tuple(sorted(forms))
