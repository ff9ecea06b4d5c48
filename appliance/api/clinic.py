"""The phone app's API (../shared/CLIENT_CONTRACT.md): parse, call `Clinic`, render.

Order of checks, as the contract fixes it: API key (401, in the auth
middleware), then X-User-Id (400), then the body (413/415/422/400).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar
from collections.abc import Awaitable

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError  # a part's invalid header (found by schemathesis)

from ..contract import case_id_text, sanitize_user_id
from ..errors import BadRequest, PayloadTooLarge, RequestTimeout, UnprocessableEntity
from ..keys import API_KEYS, CLINIC, CONFIG, KEY_NAME, SYNC
from ..security.auth import Role
from ..services import Caller, CheckedImage
from . import loads_strict
from .ops import name_answer
from .policy import Policy, route_policy

routes = web.RouteTableDef()

MAX_FIELD_BYTES = 1024  # a form field other than the file (case_id) is tiny


def caller(request: web.Request) -> Caller:
    """The caller from X-User-Id / X-User-Role, or 400.

    With keys configured, `X-User-Role: admin` counts only on an admin key; on
    any other key the caller is a plain user (role ""), so the old app, which
    always sends it, keeps working on a plain key without seeing others' cases.
    """
    user_id = sanitize_user_id(request.headers.get("X-User-Id", ""))
    if not user_id:
        raise BadRequest("Missing X-User-Id header")
    role = request.headers.get("X-User-Role", "").strip().lower()
    keys = request.config_dict[API_KEYS]
    if role == "admin" and keys and keys.role_of(request.get(KEY_NAME)) is not Role.ADMIN:
        role = ""
    return Caller(user_id=user_id, role=role)


T = TypeVar("T")


async def within_body_timeout(request: web.Request, reading: Awaitable[T]) -> T:
    """`reading`, or 408 when the client has not sent its body within `server.body_timeout_s`."""
    timeout_s = request.config_dict[CONFIG].server.body_timeout_s
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"Request body not received within {timeout_s:g} s") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (at most `server.max_json_bytes`), or 413/422."""
    server = request.app[CONFIG].server
    limit = server.max_json_bytes
    if request.content_length is not None and request.content_length > server.max_body_bytes:
        raise PayloadTooLarge(f"Request body too large (limit {server.max_body_bytes} bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"JSON body too large (limit {limit} bytes)")
    raw = await within_body_timeout(request, _read_json_capped(request, limit))
    try:
        body = loads_strict(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nested past the stack
        raise UnprocessableEntity("Invalid JSON body") from None
    if not isinstance(body, dict):
        raise UnprocessableEntity("Invalid JSON body: expected an object")
    return body


async def _read_json_capped(request: web.Request, limit: int) -> bytes:
    # A chunked body has no Content-Length: count as it arrives.
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"JSON body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: web.Request) -> tuple[bytes, str | None]:
    """The `file` part's bytes and a `case_id` form field, reading no more than the body cap."""
    return await within_body_timeout(request, _read_upload(request))


async def _read_upload(request: web.Request) -> tuple[bytes, str | None]:
    limit = request.app[CONFIG].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body too large (limit {limit} bytes)")
    if not request.content_type.startswith("multipart/"):
        raise UnprocessableEntity("Expected multipart/form-data with a 'file' part")
    data: bytes | None = None
    form_case_id: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file":
                if data is not None:  # which one would the clinician mean? refuse rather than guess
                    raise UnprocessableEntity("Only one 'file' part is accepted")
                data = await _read_capped(part, limit)
            elif part.name == "case_id":
                form_case_id = (await _read_capped(part, MAX_FIELD_BYTES)).decode("utf-8", "replace").strip()
            else:
                await part.release()
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # aiohttp's multipart parser on malformed bodies
        raise UnprocessableEntity(f"Malformed multipart body: {exc}") from None
    if data is None:
        raise UnprocessableEntity("Field 'file' is required")
    return data, form_case_id


async def _read_capped(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise UnprocessableEntity(f"Query parameter '{name}' must be true or false")


@routes.get("/health")
@route_policy(Policy.PROBE)
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.post("/check-image")
async def check_image(request: web.Request) -> web.Response:
    who = caller(request)
    sync = request.app.get(SYNC)
    if sync is not None:
        sync.check_budget()  # over the unsynced-data budget with policy "refuse": 507 before reading the body
    data, form_case_id = await read_upload(request)
    case_id = request.query.get("case_id", "").strip() or form_case_id or None
    checking = request.app[CLINIC].check_image(who, data, case_id)
    del data  # the clinic holds the only reference: the original is freed once its stripped copy is made
    checked = await checking
    return name_answer(request, web.json_response(render_checked(checked)), checked.model)


def render_checked(checked: CheckedImage) -> dict[str, Any]:
    """The contract's answer to `POST /check-image` (the app reads status, message, blur_score, predictions, ids)."""
    if checked.sharp:
        message = "Image processed"
    else:
        message = f"Image is too blurry (score={checked.blur_score:.2f}, threshold={checked.blur_threshold})"
    return {
        "status": "success" if checked.sharp else "fail",
        "message": message,
        "blur_score": checked.blur_score,
        "predictions": [{"label": p.label, "confidence": p.confidence} for p in checked.predictions],
        "image_id": checked.image_id,
        "case_id": checked.case_id,
        "user_id": checked.caller.user_id,
        "user_role": checked.caller.role,
        "low_confidence": checked.low_confidence,
        "model": checked.model,
    }


@routes.post("/cases/next-id")
async def next_case_id(request: web.Request) -> web.Response:
    who = caller(request)
    return web.json_response({"case_id": await request.app[CLINIC].next_case_id(who)})


@routes.post("/cases/release-id")
async def release_case_id(request: web.Request) -> web.Response:
    who = caller(request)
    body = await json_body(request)
    return web.json_response(await request.app[CLINIC].release_case_id(who, case_id_text(body.get("case_id"))))


async def _log(request: web.Request, entry_type: str, message: str) -> web.Response:
    who = caller(request)
    body = await json_body(request)
    stored = await request.app[CLINIC].log_case(who, entry_type, body)
    if entry_type == "reject":
        return web.json_response({"status": "ok", "message": message})
    return web.json_response(
        {"status": "ok", "message": message, "case_id": stored["case_id"], "case_status": stored["status"]}
    )


@routes.post("/cases")
async def log_case(request: web.Request) -> web.Response:
    return await _log(request, "case", "logged")


@routes.post("/cases/uncertain")
async def log_uncertain(request: web.Request) -> web.Response:
    return await _log(request, "uncertain", "uncertain_logged")


@routes.post("/cases/reject")
async def log_reject(request: web.Request) -> web.Response:
    return await _log(request, "reject", "rejected_logged")


# Not the fixed /cases/... paths: PUT on them is 405 (their method is POST), not an update of case "reject".
@routes.put(r"/cases/{case_id:(?!(?:next-id|release-id|uncertain|reject)$)[^{}/]+}")
async def update_case(request: web.Request) -> web.Response:
    who = caller(request)
    body = await json_body(request)
    case_id = request.match_info["case_id"]
    if body.get("user_id") is not None and not isinstance(body["user_id"], str):
        raise UnprocessableEntity("Field 'user_id' must be a string")
    await request.app[CLINIC].update_case(who, case_id, body)
    return web.json_response({"status": "ok", "case_id": case_id})


@routes.get("/cases")
async def list_cases(request: web.Request) -> web.Response:
    who = caller(request)
    raw_limit = request.query.get("limit", "100").strip()
    if not (raw_limit.isascii() and raw_limit.isdigit()):
        raise UnprocessableEntity("Query parameter 'limit' must be a whole number (0 for all)")
    digits = raw_limit.lstrip("0") or "0"
    limit = 10_000 if len(digits) > 5 else min(int(digits), 10_000)  # a 400-digit limit is 10 000 too
    cases = await request.app[CLINIC].list_cases(
        who,
        status=request.query.get("status", "").strip() or None,
        limit=None if limit == 0 else limit,  # 0: every record, as the old server answered it
        include_uncertain=_flag(request, "include_uncertain", True),
        include_rejected=_flag(request, "include_rejected", True),
    )
    return web.json_response({"cases": cases})
