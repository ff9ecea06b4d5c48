"""The old back end's `POST /check-image`, as it ran: FastAPI, PyTorch eager, full-size everything.

Re-created from the client contract (shared/CLIENT_CONTRACT.md) and the issue,
step for step: the upload read whole (`await file.read()`), PIL decode at full
size, `convert("RGB")`, blur as the variance of cv2's Laplacian of the
full-resolution greyscale image, torchvision's Resize(256) / CenterCrop(224) /
ToTensor / Normalize, torchvision ResNet50 with `fc = Sequential(Dropout(0.3),
Linear(2048, 7))` in eager mode under `no_grad`, the per-user
`case_counter.json` read and rewritten, the image re-encoded as JPEG quality
90 into `<root>/<user>/<image_id>.jpg`, one line appended to
`metadata.jsonl`, and the contract's answer.

The handler is `async def` because `await file.read()` needs it, so every
blocking step runs on uvicorn's event loop, one request at a time: that is
how the old server behaved under load (PyTorch still uses every core for one
inference). `--threaded` runs the blocking part in Starlette's thread pool
instead, the variant a careful author might have written, to show how much
of the gap concurrency alone would close. Nothing is fsync'd (the old server
did not). No internet: the weights come from the checkpoint only.
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision
from fastapi import FastAPI, File, Header, HTTPException, Query, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool
from torch import nn
from torchvision import transforms

LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def load_model(checkpoint: Path) -> nn.Module:
    """torchvision ResNet50 with the clinic's head, weights from the checkpoint (never downloaded)."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(2048, len(LABELS)))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model_state_dict", state.get("state_dict", state)))
    return model.eval()


def create_app(checkpoint: Path, storage_root: Path, *, blur_threshold: float = 100.0, case_id_start: int = 10000,
               api_key: str = "", threaded: bool = False) -> FastAPI:
    """The old server's app with only the endpoint the benchmark drives (plus /health)."""
    model = load_model(checkpoint)
    transform = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    storage_root.mkdir(parents=True, exist_ok=True)
    # Only --threaded needs it: two threads allocating case ids would read a half-written counter.
    files_lock = threading.Lock()
    app = FastAPI(title="Skin lesion classifier (baseline re-creation)")

    def next_case_id(user_dir: Path) -> str:
        counter = user_dir / "case_counter.json"
        last = json.loads(counter.read_text())["last_case_id"] if counter.exists() else case_id_start - 1
        counter.write_text(json.dumps({"last_case_id": last + 1}))
        return str(last + 1)

    def process(contents: bytes, user_id: str, role: str, case_id: str | None) -> dict[str, Any]:
        try:
            image = Image.open(io.BytesIO(contents)).convert("RGB")
        except Exception:
            raise HTTPException(status_code=400, detail="Invalid image file") from None
        gray = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY)
        blur_score = float(cv2.Laplacian(gray, cv2.CV_64F).var())
        with torch.no_grad():
            outputs = model(transform(image).unsqueeze(0))
            probabilities = torch.softmax(outputs, dim=1)[0].tolist()
        predictions = sorted(
            ({"label": label, "confidence": round(p, 6)} for label, p in zip(LABELS, probabilities)),
            key=lambda item: item["confidence"],
            reverse=True,
        )
        user_dir = storage_root / user_id
        user_dir.mkdir(parents=True, exist_ok=True)
        if case_id is None:
            with files_lock:
                case_id = next_case_id(user_dir)
        image_id = str(uuid.uuid4())
        image.save(user_dir / f"{image_id}.jpg", "JPEG", quality=90)
        status = "success" if blur_score >= blur_threshold else "fail"
        record = {
            "case_id": case_id, "image_id": image_id, "blur_score": round(blur_score, 2),
            "predictions": predictions, "status": status,
            "created_at": datetime.now(timezone.utc).isoformat(), "user_id": user_id, "user_role": role,
        }
        with files_lock, open(user_dir / "metadata.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        message = ("Image processed" if status == "success"
                   else f"Image is too blurry (score={blur_score:.2f}, threshold={blur_threshold})")
        return {"status": status, "message": message, "blur_score": round(blur_score, 2), "predictions": predictions,
                "image_id": image_id, "case_id": case_id, "user_id": user_id, "user_role": role}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/check-image")
    async def check_image(
        file: UploadFile = File(...),
        case_id: str | None = Query(None),
        x_api_key: str | None = Header(None),
        x_user_id: str | None = Header(None),
        x_user_role: str | None = Header(None),
    ) -> dict[str, Any]:
        if api_key and x_api_key != api_key:
            raise HTTPException(status_code=401, detail="Invalid API key")
        user_id = re.sub(r"[^A-Za-z0-9_-]", "", (x_user_id or "").strip())
        if not user_id:
            raise HTTPException(status_code=400, detail="Missing X-User-Id header")
        role = (x_user_role or "").strip().lower()
        contents = await file.read()
        if threaded:
            return await run_in_threadpool(process, contents, user_id, role, case_id)
        return process(contents, user_id, role, case_id)

    return app
