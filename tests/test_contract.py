"""The contract's facts: the case-record rules (which also make the OpenAPI schemas) and the image formats."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from appliance import imaging, privacy
from appliance.contract import (
    CASE_FIELDS, IMAGE_FORMATS, REJECT_FIELDS, UPDATE_FIELDS, case_id_text, is_case_id, record_schema, validate_fields,
)
from appliance.errors import ApplianceError, BadRequest, UnprocessableEntity

from .conftest import encode, photo


@pytest.mark.parametrize("value, ok", [
    ("0", True), ("10000", True), ("9" * 18, True),
    ("", False), ("010000", False), ("1" + "0" * 18, False), ("10 000", False), ("١٢", False), ("-1", False),
])
def test_case_id_rule(value: str, ok: bool) -> None:
    assert is_case_id(value) is ok


def test_case_id_given_as_a_number_is_its_text() -> None:
    assert [case_id_text(v) for v in (10000, 10000.0, "10000")] == ["10000", "10000", "10000"]
    assert case_id_text(10000.5) == "10000.5" and case_id_text(True) is True


def test_record_keeps_unknown_keys_drops_server_fields_and_texts_numbers() -> None:
    body = {"case_id": 10000, "age": 54, "notes": None, "image_decisions": {"a": 1}, "user_id": "other",
            "entry_type": "reject"}
    assert validate_fields(body, CASE_FIELDS) == {"case_id": "10000", "age": "54", "notes": None,
                                                  "image_decisions": {"a": 1}}


@pytest.mark.parametrize("field, value, error, detail", [
    ("created_at", 0, UnprocessableEntity, "Field 'created_at' must be a string"),
    ("case_id", "010000", BadRequest, "Invalid case_id"),
    ("case_id", 1.5, BadRequest, "Invalid case_id"),
    ("predictions", [1], UnprocessableEntity, "Field 'predictions' must be a list of {label, confidence} objects"),
    ("predictions", [{"label": 5}], UnprocessableEntity,
     "Field 'predictions' must be a list of {label, confidence} objects"),
    ("symptoms", ["itch", 2], UnprocessableEntity, "Field 'symptoms' must be a list of strings"),
    ("blur_score", True, UnprocessableEntity, "Field 'blur_score' must be a number"),
])
def test_record_refusals(field: str, value: Any, error: type[ApplianceError], detail: str) -> None:
    with pytest.raises(error) as raised:
        validate_fields({field: value}, CASE_FIELDS)
    assert raised.value.detail == detail


@pytest.mark.parametrize("fields", [CASE_FIELDS, REJECT_FIELDS, UPDATE_FIELDS], ids=["case", "reject", "update"])
@pytest.mark.parametrize("body", [
    {"case_id": "10000", "age": 54, "created_at": "2026-01-01T00:00:00", "predictions": [{"label": "nv",
                                                                                         "confidence": 0.9}]},
    {"case_id": "10000", "created_at": 0},
    {"case_id": "010000"},
    {"case_id": "10000", "symptoms": ["itch", 2]},
    {"case_id": "10000", "predictions": [{"label": None}]},
    {"case_id": "10000", "notes": None, "gender": []},
])
def test_schema_and_validation_agree(fields: dict[str, Any], body: dict[str, Any]) -> None:
    """What the generated JSON Schema allows, validation accepts, and the other way round."""
    schema = record_schema(fields)
    body = {k: v for k, v in body.items() if k in fields}
    try:
        validate_fields(body, fields)
        accepted = True
    except ApplianceError:
        accepted = False
    assert jsonschema.Draft202012Validator(schema).is_valid(body) is accepted


def test_every_accepted_format_sniffs_strips_and_has_one_suffix_and_type() -> None:
    assert len({f.suffix for f in IMAGE_FORMATS.values()}) == len({f.content_type for f in IMAGE_FORMATS.values()}) \
        == len(IMAGE_FORMATS)
    for fmt in IMAGE_FORMATS.values():
        data = encode(photo(64, 48), fmt.label.upper())
        assert imaging.sniff(data) == fmt.name
        assert imaging.sniff(privacy.strip_metadata(data, fmt.name)) == fmt.name
        assert fmt.suffix.startswith(".") and fmt.content_type == f"image/{fmt.name}"
