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

from . import imaging, privacy
from .config import ImagingConfig
from .contract import CASE_FIELDS, REJECT_FIELDS, SUFFIXES, is_case_id, sanitize_user_id, validate_fields
from .errors import BadRequest, NotFound, UnprocessableEntity
from .inference.model import LoadedModel
from .inference.scheduler import Scheduler
from .storage import Store, StoredImage

T = TypeVar("T")

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
        if case_id is None:
            return await self._in_store(self.store.next_case_id, caller.user_id)
        await self._in_store(self.store.raise_case_counter, caller.user_id, int(case_id))
        return case_id

    async def next_case_id(self, caller: Caller) -> str:
        """Allocate the caller's next case id."""
        return await self._in_store(self.store.next_case_id, caller.user_id)

    async def release_case_id(self, caller: Caller, case_id: Any) -> dict[str, Any]:
        """Give back the most recently issued id if nothing uses it."""
        if isinstance(case_id, int) and not isinstance(case_id, bool):
            case_id = str(case_id)
        if not isinstance(case_id, str) or not is_case_id(case_id):
            raise BadRequest("Invalid case_id")
        return await self._in_store(self.store.release_case_id, caller.user_id, case_id)

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
        return await self._in_store(self.store.log_case, caller.user_id, record)

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
        updated = await self._in_store(self.store.update_case, owner, case_id, fields)
        if updated is None:
            raise NotFound("Case not found")
        return updated

    async def list_cases(
        self, caller: Caller, *, status: str | None, limit: int, include_uncertain: bool, include_rejected: bool
    ) -> list[dict[str, Any]]:
        """The caller's case records (an admin's: everyone's), newest first."""
        return await self._in_store(
            lambda: self.store.list_cases(
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
