"""The use cases the clinic API calls: classify-and-store, case ids, case records.

Nothing here knows about HTTP; the API layer parses requests into these calls
and renders what they return. Blocking work goes to the app's executors:
decoding to the decode pool, inference through the scheduler, every store
call to the single store-writer thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import numpy as np

from . import cases, imaging, privacy
from .config import ImagingConfig
from .errors import BadRequest, NotFound, UnprocessableEntity
from .inference.model import LoadedModel
from .inference.scheduler import Scheduler
from .storage import Store, StoredImage

T = TypeVar("T")

SUFFIXES = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}

# Fields of a case record and the JSON type each must have (None is always
# allowed: the old app sends nulls for fields the clinician left empty).
# type[Any], not type: isinstance() then narrows a value to Any, not to object.
_TEXT: tuple[type[Any], ...] = (str,)
_NUMBER: tuple[type[Any], ...] = (int, float)
CASE_FIELDS: dict[str, tuple[type[Any], ...]] = {
    "case_id": _TEXT,
    "image_id": _TEXT,
    "blur_score": _NUMBER,
    "predictions": (list,),
    "device": _TEXT,
    "notes": _TEXT,
    "status": _TEXT,
    "gender": _TEXT,
    "age": _TEXT,
    "location": _TEXT,
    "symptoms": (list,),
    "image_paths": (list,),
    "created_at": _TEXT,
}
REJECT_FIELDS = {k: CASE_FIELDS[k] for k in (
    "case_id", "notes", "predictions", "image_id", "gender", "age", "location", "symptoms", "image_paths", "created_at",
)} | {"reason": _TEXT}
# Set by the appliance, never taken from a client's body.
SERVER_FIELDS = ("entry_type", "user_id", "user_role", "image_ids", "updated_at")


@dataclass(frozen=True)
class Caller:
    """Who is asking, from the X-User-Id and X-User-Role headers."""

    user_id: str
    role: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def now_iso() -> str:
    """The current UTC time as ISO 8601, the format every stored timestamp uses."""
    return datetime.now(timezone.utc).isoformat()


def is_case_id(value: str) -> bool:
    """Case ids are decimal numbers as the counter writes them: digits, no leading zero, at most 18.

    One spelling per id ("010000" would otherwise be a second case 10000), and
    small enough for the stores' 64-bit counters.
    """
    return value.isascii() and value.isdigit() and len(value) <= 18 and (value == "0" or value[0] != "0")


class Clinic:
    """The phone app's use cases on one model and one store."""

    def __init__(
        self,
        model: LoadedModel,
        scheduler: Scheduler,
        store: Store,
        imaging_config: ImagingConfig,
        *,
        decode_executor: Executor,
        store_executor: Executor,
        strip_metadata: bool = True,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.model = model
        self.scheduler = scheduler
        self.store = store
        self.imaging = imaging_config
        self._decode_executor = decode_executor
        self._store_executor = store_executor
        self.strip_metadata = strip_metadata  # privacy.strip_metadata_on_store
        self._model_info = model.describe()
        # Metrics hook: (stage, seconds) for decode, inference and storage.
        self.observe = observe or (lambda stage, seconds: None)

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_executor, fn, *args)

    async def check_image(self, caller: Caller, data: bytes, case_id: str | None) -> dict[str, Any]:
        """Decode, score blur, classify and store one image; the contract's answer."""
        if case_id is not None and not is_case_id(case_id):
            raise BadRequest("Invalid case_id")
        image_format = imaging.sniff(data)
        loop = asyncio.get_running_loop()
        decoding = time.monotonic()
        with self.scheduler.incoming():
            decoded = await loop.run_in_executor(
                self._decode_executor,
                lambda: imaging.decode(
                    data,
                    self.model.manifest.preprocessing,
                    max_pixels=self.imaging.max_pixels,
                    mode=self.model.served.decode,
                    blur_full_resolution=self.imaging.blur_full_resolution,
                ),
            )
            started = time.monotonic()
            self.observe("decode", started - decoding)
            inference = self.scheduler.submit(decoded.tensor)  # queued before the announcement ends

        def inferred(future: asyncio.Future[np.ndarray]) -> None:
            # Timed when the answer comes, not when this request looks (the strip may still run);
            # reading the exception also marks a failed batch's error as seen if the strip fails too.
            if not future.cancelled() and future.exception() is None:
                self.observe("inference", time.monotonic() - started)

        inference.add_done_callback(inferred)
        # Stripped while the model runs, after decoding read the orientation from the
        # original (stripping keeps it anyway); what is stored and counted is the stripped copy.
        if self.strip_metadata:
            try:
                data = await loop.run_in_executor(self._decode_executor, _strip, data, image_format)
            except BaseException:
                inference.cancel()
                raise
        probabilities = await inference
        predictions = self.rank(probabilities)
        case_id = await self._case_id_for(caller, case_id)
        blur_score = round(float(decoded.blur_score), 2)
        threshold = self.imaging.blur_threshold
        sharp = blur_score >= threshold
        image_id = str(uuid.uuid4())
        record = {
            "case_id": case_id,
            "image_id": image_id,
            "blur_score": blur_score,
            "predictions": predictions,
            "status": "success" if sharp else "fail",
            "created_at": now_iso(),
            "user_id": caller.user_id,
            "user_role": caller.role,
            "low_confidence": predictions[0]["confidence"] < self.imaging.conf_threshold,
            "model": self._model_info,
            "format": image_format,
            "width": decoded.width,
            "height": decoded.height,
            "bytes": len(data),
        }
        stored = StoredImage(image_id=image_id, data=data, suffix=SUFFIXES[image_format])
        started = time.monotonic()
        await self._in_store(self.store.save_image, caller.user_id, stored, record)
        self.observe("storage", time.monotonic() - started)
        message = "Image processed" if sharp else f"Image is too blurry (score={blur_score:.2f}, threshold={threshold})"
        return {
            "status": record["status"],
            "message": message,
            "blur_score": blur_score,
            "predictions": predictions,
            "image_id": image_id,
            "case_id": case_id,
            "user_id": caller.user_id,
            "user_role": caller.role,
            "low_confidence": record["low_confidence"],
            "model": self._model_info,
        }

    def rank(self, probabilities: np.ndarray) -> list[dict[str, Any]]:
        """Every label with its probability, highest first (the app reads element 0)."""
        labels = self.model.manifest.labels
        order = np.argsort(-probabilities, kind="stable")
        return [{"label": labels[i], "confidence": round(float(probabilities[i]), 6)} for i in order]

    async def _case_id_for(self, caller: Caller, case_id: str | None) -> str:
        """The client's case id, with the counter moved past it so it is never issued again; else the next id."""
        return await self._in_store(cases.claim_case_id, self.store, caller.user_id, case_id)

    async def next_case_id(self, caller: Caller) -> str:
        """Allocate the caller's next case id."""
        return await self._in_store(cases.next_case_id, self.store, caller.user_id)

    async def release_case_id(self, caller: Caller, case_id: Any) -> dict[str, Any]:
        """Give back the most recently issued id if nothing uses it."""
        if isinstance(case_id, int) and not isinstance(case_id, bool):
            case_id = str(case_id)
        if not isinstance(case_id, str) or not is_case_id(case_id):
            raise BadRequest("Invalid case_id")
        return await self._in_store(cases.release_case_id, self.store, caller.user_id, case_id)

    async def log_case(self, caller: Caller, entry_type: str, body: dict[str, Any]) -> dict[str, Any]:
        """Store a case, uncertain or reject record (replacing an earlier one of that case)."""
        fields = REJECT_FIELDS if entry_type == "reject" else CASE_FIELDS
        record = validate_fields(body, fields)
        if record.get("case_id") is None:
            raise UnprocessableEntity("Field 'case_id' is required")
        record.setdefault("created_at", None)
        record["created_at"] = record["created_at"] or now_iso()
        if entry_type == "reject":
            record["status"] = "rejected"
        else:
            record["status"] = record.get("status") or "pending"
        record.update(entry_type=entry_type, user_id=caller.user_id, user_role=caller.role)
        await self._case_id_for(caller, record["case_id"])
        return await self._in_store(cases.log_case, self.store, caller.user_id, record)

    async def update_case(self, caller: Caller, case_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Update the latest case/uncertain record of that id; an admin may name the user."""
        if not is_case_id(case_id):
            raise BadRequest("Invalid case_id")
        owner = caller.user_id
        if caller.is_admin and isinstance(body.get("user_id"), str) and body["user_id"].strip():
            owner = sanitize_user_id(body["user_id"]) or owner
        updatable = {k: v for k, v in CASE_FIELDS.items() if k != "case_id"}
        fields = validate_fields({k: v for k, v in body.items() if k in updatable}, updatable)
        if not fields:
            raise BadRequest("No fields to update")
        fields["updated_at"] = now_iso()
        updated = await self._in_store(cases.update_case, self.store, owner, case_id, fields)
        if updated is None:
            raise NotFound("Case not found")
        return updated

    async def list_cases(
        self, caller: Caller, *, status: str | None, limit: int, include_uncertain: bool, include_rejected: bool
    ) -> list[dict[str, Any]]:
        """The caller's case records (an admin's: everyone's), newest first."""
        return await self._in_store(
            lambda: cases.list_cases(
                self.store,
                None if caller.is_admin else caller.user_id,
                status=status or None,
                limit=limit,
                include_uncertain=include_uncertain,
                include_rejected=include_rejected,
            )
        )


def _strip(data: bytes, image_format: str) -> bytes:
    """The image without its location and device metadata; 400 when its structure is broken."""
    try:
        return privacy.strip_metadata(data, image_format)
    except privacy.MetadataError:
        # Storing it unstripped could keep a location the clinic asked to remove.
        raise BadRequest("Invalid image file") from None


def sanitize_user_id(raw: str) -> str:
    """Trim, then keep only letters, digits, '-' and '_' (the contract's X-User-Id rule)."""
    return "".join(c for c in raw.strip() if (c.isascii() and c.isalnum()) or c in "-_")[:128]


def validate_fields(body: dict[str, Any], fields: dict[str, tuple[type[Any], ...]]) -> dict[str, Any]:
    """Check the known fields' types (coercing numbers to text where the app sends text).

    Unknown keys are kept as given (the app sends e.g. `image_decisions`),
    except the ones the appliance sets itself.
    """
    record: dict[str, Any] = {}
    for key, value in body.items():
        if key in SERVER_FIELDS:
            continue
        expected = fields.get(key)
        if expected is None or value is None:
            record[key] = value
            continue
        if expected == _TEXT and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, expected) or isinstance(value, bool):
            kind = {_TEXT: "a string", _NUMBER: "a number"}.get(expected, "a list")
            raise UnprocessableEntity(f"Field '{key}' must be {kind}")
        if key in ("symptoms", "image_paths") and not all(isinstance(v, str) for v in value):
            raise UnprocessableEntity(f"Field '{key}' must be a list of strings")
        if key == "case_id" and not is_case_id(value):
            raise BadRequest("Invalid case_id")
        record[key] = value
    return record
