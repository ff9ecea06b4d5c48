"""`GET /openapi.json`: the OpenAPI 3.1 description of every endpoint the appliance serves.

The document is data built once here; tests/test_openapi.py keeps it true
(every route in the live router is in it and nothing else) and runs
schemathesis against a live server. The served copy fills in the running
model's name and version as examples for the KServe paths.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import __version__
from ..contract import (
    CASE_FIELDS, CASE_ID_SCHEMA, IMAGE_FORMATS, REJECT_FIELDS, UPDATE_FIELDS, USER_ID_PATTERN, record_schema,
)
from ..keys import CONFIG, MODELS
from .policy import Policy, route_policy

routes = web.RouteTableDef()

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required), **extra}


def _text(nullable: bool = False) -> Schema:
    return {"type": ["string", "null"]} if nullable else {"type": "string"}


_PREDICTION = _obj({"label": _text(), "confidence": {"type": "number"}}, ("label", "confidence"))
def _case_update() -> Schema:
    """Any subset of a case's fields but its id, at least one of them (else 400 "No fields to update")."""
    schema = record_schema(UPDATE_FIELDS)
    schema["properties"]["user_id"] = {"type": ["string", "null"], "description": "an admin names another user's case"}
    schema["anyOf"] = [{"required": [key]} for key in UPDATE_FIELDS]
    return schema


_V2_TENSOR_METADATA = _obj(
    {"name": _text(), "datatype": _text(), "shape": {"type": "array", "items": {"type": "integer"}}},
    ("name", "datatype", "shape"),
)
_V2_PARAMETERS = {"type": "object", "additionalProperties": True}

SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"detail": _text()}, ("detail",)),
    "V2Error": _obj({"error": _text()}, ("error",)),
    "Prediction": _PREDICTION,
    "ModelInfo": _obj(
        {"name": _text(), "version": _text(), "artifact": _text(), "precision": _text(), "runtime": _text(),
         "device": _text(), "demo": {"type": "boolean"}, "degraded": {"type": "boolean"}},
        ("name", "version", "artifact", "precision", "runtime", "device", "demo"),
    ),
    "CheckImageResponse": _obj(
        {"status": {"enum": ["success", "fail"]}, "message": _text(), "blur_score": {"type": "number"},
         "predictions": {"type": "array", "items": _ref("Prediction")}, "image_id": _text(), "case_id": _text(),
         "user_id": _text(), "user_role": _text(), "low_confidence": {"type": "boolean"}, "model": _ref("ModelInfo")},
        ("status", "message", "blur_score", "predictions", "image_id", "case_id", "user_id", "user_role"),
    ),
    # What the counter issues: decimal, no leading zero (past 18 digits only after 10^18 ids).
    "CaseId": _obj({"case_id": {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"}}, ("case_id",)),
    "ReleaseIdRequest": _obj({"case_id": CASE_FIELDS["case_id"].schema()}, ("case_id",)),
    "ReleaseIdResponse": _obj(
        {"status": {"enum": ["ok", "skipped"]}, "case_id": _text(),
         "reason": {"enum": ["counter_mismatch", "case_in_use", "missing_counter"]}, "last_case_id": _text()},
        ("status",),
    ),
    "CaseRecord": record_schema(CASE_FIELDS, ("case_id",)),
    "RejectRecord": record_schema(REJECT_FIELDS, ("case_id",)),
    "CaseUpdate": _case_update(),
    "LoggedCase": _obj(
        {"status": {"const": "ok"}, "message": {"enum": ["logged", "uncertain_logged"]}, "case_id": _text(),
         "case_status": _text()},
        ("status", "message", "case_id", "case_status"),
    ),
    "LoggedReject": _obj({"status": {"const": "ok"}, "message": {"const": "rejected_logged"}}, ("status", "message")),
    "UpdatedCase": _obj({"status": {"const": "ok"}, "case_id": _text()}, ("status", "case_id")),
    "Cases": _obj(
        {"cases": {"type": "array", "items": _obj(
            {"case_id": _text(), "entry_type": {"enum": ["case", "uncertain", "reject"]}, "status": _text(True)},
            ("case_id", "entry_type"), additionalProperties=True)}},
        ("cases",),
    ),
    "Ready": _obj(
        {"status": {"enum": ["ready", "not ready"]}, "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
         "detail": _text()},
        ("status", "checks"), additionalProperties=False,  # public: check names only (details in /v1/status)
    ),
    "Info": _obj(
        {"appliance": _obj({"version": _text(), "uptime_s": {"type": "number"}, "ready": {"type": "boolean"}},
                           ("version", "uptime_s")),
         "model": _ref("ModelInfo"), "labels": {"type": "array", "items": _text()}, "runtime": {"type": "object"},
         "selfcheck": {"type": "object"}, "inference": {"type": "object"}, "imaging": {"type": "object"},
         "storage": {"type": "object"}},
        ("appliance", "model", "labels", "runtime", "selfcheck", "inference", "imaging", "storage"),
    ),
    "Status": _obj(
        {key: {"type": ["object", "null"]} for key in (
            "appliance", "model", "runtime", "recent", "inference", "storage", "sync", "security")},
        ("appliance", "model", "runtime", "recent", "inference", "storage", "sync", "security"),
    ),
    "V2Live": _obj({"live": {"type": "boolean"}}, ("live",)),
    "V2Ready": _obj({"ready": {"type": "boolean"}}, ("ready",)),
    "V2ModelReady": _obj({"name": _text(), "ready": {"type": "boolean"}}, ("name", "ready")),
    "V2ServerMetadata": _obj(
        {"name": _text(), "version": _text(), "extensions": {"type": "array", "items": _text()}},
        ("name", "version", "extensions"),
    ),
    "V2ModelMetadata": _obj(
        {"name": _text(), "versions": {"type": "array", "items": _text()}, "platform": _text(),
         "inputs": {"type": "array", "items": _V2_TENSOR_METADATA},
         "outputs": {"type": "array", "items": _V2_TENSOR_METADATA},
         "parameters": _obj({"labels": {"type": "array", "items": _text()}, "demo": {"type": "boolean"}})},
        ("name", "platform", "inputs", "outputs"),
    ),
    "V2InferenceResponse": _obj(
        {"model_name": _text(), "model_version": _text(), "id": _text(), "outputs": {"type": "array", "items": _obj(
            {"name": _text(), "datatype": {"const": "FP32"},
             "shape": {"type": "array", "items": {"type": "integer"}},
             "data": {"type": "array", "items": {"type": "number"}},
             "parameters": _obj({"binary_data_size": {"type": "integer"}})},
            ("name", "datatype", "shape"),
        )}},
        ("model_name", "model_version", "outputs"),
    ),
}



def _infer_request(input_name: str, output_name: str, crop: int, max_rows: int) -> Schema:
    """A JSON inference request for the served model: its one input as FP32 or BYTES, its one output.

    JSON Schema cannot say that `data` holds as many values as the shape
    needs, nor that a BYTES element is a decodable image: the server answers
    those with 400 (schemathesis.toml says so for these operations).
    """
    rows = {"type": "integer", "minimum": 1, "maximum": max_rows}
    fp32 = _obj(
        {"name": {"const": input_name}, "datatype": {"const": "FP32"},
         "shape": {"type": "array", "prefixItems": [rows, {"const": 3}, {"const": crop}, {"const": crop}],
                   "minItems": 4, "maxItems": 4},
         "parameters": {"type": "object"},
         "data": {"type": "array", "description": "N*3*crop*crop finite numbers, flat or nested, row-major"}},
        ("name", "datatype", "shape", "data"),
    )
    encoded = _obj(
        {"name": {"const": input_name}, "datatype": {"const": "BYTES"},
         "shape": {"type": "array", "prefixItems": [rows], "minItems": 1, "maxItems": 1},
         "parameters": {"type": "object"},
         "data": {"type": "array", "minItems": 1, "maxItems": max_rows, "description": "N encoded images",
                  "items": {"type": "string", "contentEncoding": "base64"}}},
        ("name", "datatype", "shape", "data"),
    )
    return _obj(
        {
            "id": _text(True),
            "parameters": _obj({"binary_data_output": {"type": "boolean"}}, additionalProperties=True),
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"oneOf": [fp32, encoded]}},
            "outputs": {"type": ["array", "null"], "items": _obj(
                {"name": {"const": output_name},
                 "parameters": _obj({"binary_data": {"type": "boolean"}}, additionalProperties=True)},
                ("name",),
            )},
        },
        ("inputs",),
    )


_REASONS = {
    400: "Malformed request", 401: "Missing or wrong API key", 403: "The key's role may not call this (a metrics key)",
    404: "Not found", 409: "Conflicts with what is served (unloading the only model)",
    408: "The body did not arrive within server.body_timeout_s", 413: "Too large",
    415: "An image type that is not accepted", 422: "Invalid body", 429: "Rate limited (see Retry-After)",
    503: "Overloaded or not ready (see Retry-After)", 507: "The sync backlog is over its disk budget",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}}


def _json(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _case_links(case_id: str) -> dict[str, Any]:
    """Links from an answer naming a case id (`case_id` at `case_id`) to what a client does next with it.

    They let schemathesis' stateful phase follow the app's own flows (tests/test_stateful.py).
    """
    return {"links": {
        "LogThisCase": {"operationRef": "#/paths/~1cases/post", "requestBody": {"case_id": case_id}},
        "UpdateThisCase": {"operationRef": "#/paths/~1cases~1{case_id}/put", "parameters": {"path.case_id": case_id}},
        "PhotographThisCase": {"operationRef": "#/paths/~1check-image/post",
                               "parameters": {"query.case_id": case_id}},
        "ListCases": {"operationRef": "#/paths/~1cases/get", "parameters": {"query.include_uncertain": True}},
    }}


def _op(summary: str, ok: dict[str, Any], errors: tuple[int, ...] = (), *, public: bool = False, v2: bool = False,
        parameters: list[Any] | None = None, body: dict[str, Any] | None = None, tag: str = "clinic") -> dict[str, Any]:
    """One operation: its 200 answer, and each error status in the error shape of its API."""
    error = _ref("V2Error" if v2 else "Error")
    statuses = set(errors) | {429} | (set() if public else {401, 403})
    if body:  # the guards: a slow body (408), too many bodies in flight (503)
        statuses |= {408, 413, 503}
    responses: dict[str, Any] = {"200": ok}
    for status in sorted(statuses):
        responses[str(status)] = _json(error, _REASONS[status])
        if status in (429, 503):
            responses[str(status)]["headers"] = _RETRY_AFTER
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if public:
        op["security"] = []
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    return op


def _static(summary: str, media_type: str) -> dict[str, Any]:
    return _op(summary, {"description": "OK", "content": {media_type: {"schema": {"type": "string"}}}}, public=True,
               tag="operations")


def _param(where: str, name: str, schema: Schema, required: bool = False, description: str = "") -> dict[str, Any]:
    param = {"in": where, "name": name, "required": required, "schema": schema}
    if description:
        param["description"] = description
    return param


_USER = [
    _param("header", "X-User-Id", {"type": "string", "pattern": USER_ID_PATTERN}, True,
           "letters, digits, - and _ are kept; at least one of them"),
    _param("header", "X-User-Role", {"type": "string"},
           description='"admin" sees every user\'s cases (with keys configured: on an admin key only)'),
]
_CLINIC_ERRORS = (400, 413, 422)
# Other parts are ignored, but a part's name is a header value: no control characters.
_PART_NAME = {"pattern": "^[^\\x00-\\x1f\\x7f]*$"}
# The query's case id is trimmed, and an empty one is no case id.
_CHECK_IMAGE_CASE_ID = r"^\s*(0|[1-9][0-9]{0,17})?\s*$"


def _json_body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(schema_name)}}}

_MODEL = {"$ref": "#/components/parameters/ModelName"}
_VERSION = {"$ref": "#/components/parameters/ModelVersion"}


def _v2_model_paths(suffix: str, op: dict[str, Any]) -> dict[str, Any]:
    """The same operation on `/v2/models/{name}...` and `/v2/models/{name}/versions/{version}...`."""
    method = next(iter(op))
    plain = copy.deepcopy(op)
    plain[method]["parameters"] = [_MODEL, *plain[method].get("parameters", [])]
    versioned = copy.deepcopy(op)
    versioned[method]["parameters"] = [_MODEL, _VERSION, *versioned[method].get("parameters", [])]
    return {f"/v2/models/{{name}}{suffix}": plain, f"/v2/models/{{name}}/versions/{{version}}{suffix}": versioned}


# An 8x8 skin-toned PNG: the example request is a real one (schemathesis sends it).
TINY_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM80VPBgA0wYRUdtBIAay8B3Dn/k18AAAAASUVORK5CYII="
_INFER_BODY = {
    "required": True,
    "description": (
        "JSON, or the binary tensor data extension: a JSON header of Inference-Header-Content-Length bytes, then "
        "each input's binary_data_size bytes (FP32 little-endian; BYTES: per element a 4-byte little-endian "
        "length and the encoded image)."
    ),
    "content": {
        JSON: {"schema": _ref("V2InferenceRequest"), "example": {
            "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [TINY_PNG_BASE64]}]}},
    },
}
_INFER_OK = {
    "description": "probabilities FP32 [N, classes] in label order; binary when asked (binary_data_output)",
    "headers": {"Inference-Header-Content-Length": {"schema": {"type": "string"},
                                                    "description": "length of the JSON header (binary answers)"}},
    "content": {
        JSON: {"schema": _ref("V2InferenceResponse")},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

PATHS: dict[str, Any] = {
    "/health": {"get": _op("Liveness (the contract's probe)", _json(_obj({"status": {"const": "ok"}}, ("status",))),
                           public=True)},
    "/check-image": {"post": _op(
        "Classify, score blur and store one photo",
        _json(_ref("CheckImageResponse")) | _case_links("$response.body#/case_id"), (*_CLINIC_ERRORS, 415, 503, 507),
        parameters=[*_USER, _param("query", "case_id", {"type": "string", "pattern": _CHECK_IMAGE_CASE_ID},
                                   description="absent or empty: the caller's next case id")],
        body={"required": True, "description": "A form field `case_id` is read when the query names none "
                                                "(the old server's clients sent it).",
              "content": {"multipart/form-data": {
                  "schema": _obj({"file": {"type": "string", "format": "binary", "minLength": 1}}, ("file",),
                                 propertyNames=_PART_NAME),
                  "encoding": {"file": {"contentType": ", ".join(f.content_type for f in IMAGE_FORMATS.values())}},
              }}},
    )},
    "/cases/next-id": {"post": _op("Allocate the caller's next case id",
                                   _json(_ref("CaseId")) | _case_links("$response.body#/case_id"), (400,),
                                   parameters=_USER)},
    "/cases/release-id": {"post": _op("Give back the last issued case id if unused", _json(_ref("ReleaseIdResponse")),
                                      _CLINIC_ERRORS, parameters=_USER, body=_json_body("ReleaseIdRequest"))},
    "/cases": {
        "post": _op("Log a case record (upsert)", _json(_ref("LoggedCase")) | _case_links("$response.body#/case_id"),
                    _CLINIC_ERRORS, parameters=_USER, body=_json_body("CaseRecord")),
        "get": _op("The caller's case records, newest first (an admin's: everyone's)", _json(_ref("Cases")),
                   _CLINIC_ERRORS, parameters=[
                       *_USER,
                       _param("query", "status", {"type": "string"}),
                       _param("query", "limit", {"type": "integer", "minimum": 0}),  # 0: all
                       _param("query", "include_uncertain", {"type": "boolean"}),
                       _param("query", "include_rejected", {"type": "boolean"}),
                   ]),
    },
    "/cases/uncertain": {"post": _op("Log an uncertain record",
                                     _json(_ref("LoggedCase")) | _case_links("$response.body#/case_id"), _CLINIC_ERRORS,
                                     parameters=_USER, body=_json_body("CaseRecord"))},
    "/cases/reject": {"post": _op("Log a rejection", _json(_ref("LoggedReject")), _CLINIC_ERRORS, parameters=_USER,
                                  body=_json_body("RejectRecord"))},
    "/cases/{case_id}": {"put": _op(
        "Update the latest case/uncertain record of a case id", _json(_ref("UpdatedCase")), (*_CLINIC_ERRORS, 404),
        parameters=[_param("path", "case_id", CASE_ID_SCHEMA, True), *_USER], body=_json_body("CaseUpdate"),
    )},
    "/ready": {"get": _op("Readiness: model self-checked and store answering", _json(_ref("Ready")), public=True,
                          tag="operations") | {"responses": {
        "200": _json(_ref("Ready")),
        "429": _json(_ref("Error"), _REASONS[429]) | {"headers": _RETRY_AFTER},
        "503": _json(_ref("Ready"), "Not ready (see detail and Retry-After)") | {"headers": _RETRY_AFTER},
    }}},
    "/": {"get": _static("The status page for clinic IT staff", "text/html")},
    "/static/status.css": {"get": _static("The status page's style sheet", "text/css")},
    "/static/status.js": {"get": _static("The status page's script", "application/javascript")},
    "/v1/status": {"get": _op("The status page's figures (counts and timings, no patient data)",
                              _json(_ref("Status")), tag="operations")},
    "/metrics": {"get": _op("Prometheus metrics", {"description": "OK", "content": {
        "text/plain": {"schema": {"type": "string"}}}}, tag="operations")},
    "/v1/info": {"get": _op("The running model, runtime, self-check figures and limits", _json(_ref("Info")),
                            tag="operations")},
    "/openapi.json": {"get": _op("This document", _json({"type": "object"}), public=True, tag="operations")},
    "/v2/health/live": {"get": _op("KServe v2 server live", _json(_ref("V2Live")), public=True, v2=True, tag="kserve")},
    "/v2/health/ready": {"get": _op("KServe v2 server ready", _json(_ref("V2Ready")), (503,), public=True, v2=True,
                                    tag="kserve")},
    "/v2": {"get": _op("KServe v2 server metadata", _json(_ref("V2ServerMetadata")), v2=True, tag="kserve")},
    **_v2_model_paths("", {"get": _op("KServe v2 model metadata", _json(_ref("V2ModelMetadata")), (404,), v2=True,
                                      tag="kserve")}),
    **_v2_model_paths("/ready", {"get": _op("KServe v2 model ready", _json(_ref("V2ModelReady")), (404, 503),
                                            v2=True, tag="kserve")}),
    "/v2/repository/index": {"post": _op(
        "KServe v2 model repository: the served model's versions (admin key; open mode: loopback only)",
        _json({"type": "array", "items": {"type": "object"}}), v2=True, tag="kserve")},
    "/v2/repository/models/{name}/load": {"post": _op(
        "Reload: serve the version model.path / model.pin_version name once it passed its checks (admin key)",
        _json({"type": "object"}), (404, 422), v2=True, tag="kserve", parameters=[_MODEL])},
    "/v2/repository/models/{name}/unload": {"post": _op(
        "Refused (409): the only served model cannot be unloaded (admin key)",
        _json({"type": "object"}), (404, 409), v2=True, tag="kserve", parameters=[_MODEL])},
    **_v2_model_paths("/infer", {"post": _op(
        "KServe v2 inference: FP32 [N, 3, 224, 224] preprocessed, or BYTES [N] encoded images (JPEG, PNG, WebP)",
        _INFER_OK, (400, 404, 413, 415, 503), v2=True, tag="kserve", body=_INFER_BODY,
    )}),
}


@dataclass(frozen=True)
class Served:
    """What the document says of the served model: its names, its input's size and the batch limit."""

    input_name: str = "input"
    output_name: str = "probabilities"
    crop: int = 224
    max_rows: int = 32  # inference.queue_size


@functools.lru_cache(maxsize=4)
def document_text(model_name: str, model_version: str, served: Served = Served()) -> str:
    """The document as JSON, with the served model's name and version as path examples."""
    return json.dumps(document(model_name, model_version, served))


def document(
    model_name: str = "ham10000-resnet50", model_version: str = "1", served: Served = Served()
) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy) for the served model."""
    schemas = copy.deepcopy(SCHEMAS)
    schemas["V2InferenceRequest"] = _infer_request(served.input_name, served.output_name, served.crop, served.max_rows)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Dermatology edge appliance",
            "version": __version__,
            "description": "The clinic API (the phone app's contract), operators' endpoints and KServe v2 "
                           "(Open Inference Protocol) REST. Errors are {\"detail\": ...}, on /v2 {\"error\": ...}.",
        },
        "paths": copy.deepcopy(PATHS),
        "components": {
            "schemas": schemas,
            "parameters": {
                "ModelName": _param("path", "name", {"type": "string"}, True, "the served model's name") | {
                    "example": model_name},
                "ModelVersion": _param("path", "version", {"type": "string"}, True, "its version") | {
                    "example": model_version},
            },
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        # Checked only when API keys are configured; `{}` says the appliance may be open.
        "security": [{"ApiKey": []}, {"Bearer": []}, {}],
    }


@routes.get("/openapi.json")
@route_policy(Policy.PUBLIC)
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document of this appliance (no API key needed)."""
    manifest = request.app[MODELS].current.manifest
    served = Served(manifest.input_name, manifest.output_name, manifest.preprocessing.crop,
                    request.app[CONFIG].inference.queue_size)
    return web.Response(text=document_text(manifest.name, manifest.version, served), content_type=JSON)
