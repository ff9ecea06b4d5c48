"""The use cases the clinic API calls: classify-and-store, case ids, case records.

Nothing here knows about HTTP; the API layer parses requests into these calls
and renders what they return. Blocking work goes to the app's executors:
decoding to the decode pool, inference through the scheduler, every store
call to the single store-writer thread.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar
from collections.abc import Callable, Iterable

import numpy as np

from . import cases, imaging, privacy
from .config import ImagingConfig
from .contract import CASE_FIELDS, IMAGE_FORMATS, REJECT_FIELDS, is_case_id, sanitize_user_id, validate_fields
from .errors import ApplianceError, BadRequest, NotFound, UnprocessableEntity
from .inference.model import LoadedModel
from .inference.proof import ParityWatch
from .inference.scheduler import Scheduler
from .storage import Store, StoredImage

T = TypeVar("T")

@dataclass(frozen=True)
class Caller:
    """Who is asking, from the X-User-Id and X-User-Role headers (role "admin" only as the API key allows)."""

    user_id: str
    role: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def now_iso() -> str:
    """The current UTC time as ISO 8601, the format every stored timestamp uses."""
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class Prediction:
    """One label and its probability."""

    label: str
    confidence: float


@dataclass(frozen=True)
class CheckedImage:
    """A classified and stored photo: what `POST /check-image` answers with."""

    image_id: str
    case_id: str
    caller: Caller
    blur_score: float  # rounded to 2 places, as stored
    blur_threshold: float
    predictions: list[Prediction]  # every label, highest first
    low_confidence: bool  # the top confidence is below imaging.conf_threshold
    model: dict[str, Any]  # the served model's description

    @property
    def sharp(self) -> bool:
        """Sharp enough: a blurry photo is still classified and stored, but marked so."""
        return self.blur_score >= self.blur_threshold


def _unobserved(stage: str, seconds: float) -> None:
    """The default metrics hook: the timings go nowhere."""


@dataclass
class Classifier:
    """The classify use case of /check-image and KServe v2 alike: decode in the decode pool, infer via the scheduler."""

    model: LoadedModel
    scheduler: Scheduler
    max_pixels: int  # imaging.max_pixels
    decode_executor: Executor
    observe: Callable[[str, float], None] = _unobserved  # metrics hook: (stage, seconds) for decode and inference
    model_info: dict[str, Any] = field(init=False)  # the served model's description, read once

    def __post_init__(self) -> None:
        self.model_info = self.model.describe()

    async def _decode(self, data: bytes, blur_full_resolution: bool) -> imaging.DecodedImage:
        decoding = time.monotonic()
        decoded = await asyncio.get_running_loop().run_in_executor(
            self.decode_executor,
            functools.partial(
                imaging.decode, data, self.model.manifest.preprocessing, max_pixels=self.max_pixels,
                mode=self.model.served.decode, blur_full_resolution=blur_full_resolution,
            ),
        )
        self.observe("decode", time.monotonic() - decoding)
        return decoded

    def _submit(self, tensor: np.ndarray) -> asyncio.Future[np.ndarray]:
        started = time.monotonic()
        inference = self.scheduler.submit(tensor, self.model.runtime)  # this version's runtime, even after a swap

        def inferred(future: asyncio.Future[np.ndarray]) -> None:
            # Timed when the answer comes, not when the request looks (it may be busy elsewhere);
            # reading the exception also marks a failed batch's error as seen if the request fails too.
            if not future.cancelled() and future.exception() is None:
                self.observe("inference", time.monotonic() - started)

        inference.add_done_callback(inferred)
        return inference

    async def start(
        self, data: bytes, *, blur_full_resolution: bool
    ) -> tuple[imaging.DecodedImage, asyncio.Future[np.ndarray]]:
        """Decode one image and queue it; the future is its probabilities (cancel it to withdraw)."""
        with self.scheduler.incoming(self.model.runtime):
            decoded = await self._decode(data, blur_full_resolution)
            return decoded, self._submit(decoded.tensor)  # queued before the announcement ends

    async def classify_images(self, images: list[bytes]) -> np.ndarray:
        """Probabilities [N, classes] of encoded images; the first bad one fails them all, naming its index."""
        with self.scheduler.incoming(self.model.runtime):
            decoded = await asyncio.gather(*(self._decode(data, False) for data in images), return_exceptions=True)
            tensors = []
            for index, result in enumerate(decoded):
                if isinstance(result, ApplianceError):
                    # One answer carries the whole batch, so a bad element cannot be answered on its own.
                    result.detail = f"Input '{self.model.manifest.input_name}' element {index}: {result.detail}"
                    raise result
                if isinstance(result, BaseException):
                    raise result
                tensors.append(result.tensor)
            return await self.classify_tensors(tensors)

    async def classify_tensors(self, tensors: Iterable[np.ndarray]) -> np.ndarray:
        """Probabilities [N, classes] of preprocessed images, each row through the scheduler (batching, queue limit)."""
        futures: list[asyncio.Future[np.ndarray]] = []
        try:
            for tensor in tensors:
                futures.append(self._submit(tensor))
        except BaseException:  # a full queue: withdraw the rows already queued
            for future in futures:
                future.cancel()
            raise
        results = await asyncio.gather(*futures, return_exceptions=True)
        rows: list[np.ndarray] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            rows.append(result)
        return np.stack(rows).astype("<f4")

    def rank(self, probabilities: np.ndarray) -> list[Prediction]:
        """Every label with its probability, highest first (the app reads element 0)."""
        labels = self.model.manifest.labels
        order = np.argsort(-probabilities, kind="stable")
        return [Prediction(labels[i], round(float(probabilities[i]), 6)) for i in order]


class Clinic:
    """The phone app's use cases on one model and one store."""

    def __init__(
        self,
        classifier: Classifier,
        store: Store,
        imaging_config: ImagingConfig,
        *,
        store_executor: Executor,
        strip_metadata: bool = True,
        observe: Callable[[str, float], None] | None = None,
        watch: ParityWatch | None = None,
    ) -> None:
        self.classifier = classifier
        self.store = store
        self.imaging = imaging_config
        self._store_executor = store_executor
        self.strip_metadata = strip_metadata  # privacy.strip_metadata_on_store
        # Metrics hook: (stage, seconds) for storage (the classifier times decode and inference).
        self.observe = observe or _unobserved
        self.watch = watch  # offered every answered photo (inference/proof.py's live parity watch)

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_executor, fn, *args)

    async def check_image(self, caller: Caller, data: bytes, case_id: str | None) -> CheckedImage:
        """Decode, score blur, classify and store one image."""
        if case_id is not None and not is_case_id(case_id):
            raise BadRequest("Invalid case_id")
        image_format = imaging.sniff(data)
        original = data  # what was classified, for the live parity watch (stripping may change the bytes)
        # One classifier for the whole request: a model swap meanwhile must not mix versions in one answer.
        classifier = self.classifier
        decoded, inference = await classifier.start(data, blur_full_resolution=self.imaging.blur_full_resolution)
        # Stripped while the model runs, after decoding read the orientation from the
        # original (stripping keeps it anyway); what is stored and counted is the stripped copy.
        if self.strip_metadata:
            try:
                data = await asyncio.get_running_loop().run_in_executor(
                    classifier.decode_executor, _strip, data, image_format)
            except BaseException:
                inference.cancel()
                raise
        probabilities = await inference
        predictions = classifier.rank(probabilities)
        if self.watch is not None:
            self.watch.offer(classifier.model, original, probabilities)
        case_id = await self._case_id_for(caller, case_id)
        checked = CheckedImage(
            image_id=str(uuid.uuid4()),
            case_id=case_id,
            caller=caller,
            blur_score=round(float(decoded.blur_score), 2),
            blur_threshold=self.imaging.blur_threshold,
            predictions=predictions,
            low_confidence=predictions[0].confidence < self.imaging.conf_threshold,
            model=classifier.model_info,
        )
        record = {
            "case_id": case_id,
            "image_id": checked.image_id,
            "blur_score": checked.blur_score,
            "predictions": [asdict(p) for p in predictions],
            "status": "success" if checked.sharp else "fail",
            "created_at": now_iso(),
            "user_id": caller.user_id,
            "user_role": caller.role,
            "low_confidence": checked.low_confidence,
            "model": checked.model,
            "format": image_format,
            "width": decoded.width,
            "height": decoded.height,
            "bytes": len(data),
        }
        stored = StoredImage(image_id=checked.image_id, data=data, suffix=IMAGE_FORMATS[image_format].suffix)
        started = time.monotonic()
        await self._in_store(self.store.save_image, caller.user_id, stored, record)
        self.observe("storage", time.monotonic() - started)
        return checked

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
        self, caller: Caller, *, status: str | None, limit: int | None, include_uncertain: bool, include_rejected: bool
    ) -> list[dict[str, Any]]:
        """The caller's case records (an admin's: everyone's), newest first; at most `limit` (None: all)."""
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
