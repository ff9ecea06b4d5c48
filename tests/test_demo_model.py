"""The server end to end on the real demo model that `convert` builds: every runtime, INT8 by default."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.app import create_app
from appliance.config import parse_config
from appliance.security import ApiKeys
from convert.demo import synthetic_photos

from .conftest import LABELS, encode

EXPECTED_ARTIFACT = {"onnxruntime": "onnx-int8", "openvino": "openvino-int8"}


@pytest.mark.parametrize("runtime", sorted(EXPECTED_ARTIFACT))
async def test_demo_model_serves_int8_after_its_self_check(
    aiohttp_client: Any, demo_model_dir: Path, tmp_path: Path, runtime: str
) -> None:
    config = parse_config({
        "model": {"path": str(demo_model_dir.parent)},
        "runtime": {"backend": runtime},
        "storage": {"root": str(tmp_path / "data")},
    })
    client = await aiohttp_client(create_app(config, api_keys=ApiKeys.of({})))
    ready = await (await client.get("/ready")).json()
    assert ready["status"] == "ready"
    for photo in synthetic_photos(4, seed=123, size=(1600, 1200)):
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(encode(photo)), filename="lesion.jpg", content_type="image/jpeg")
        response = await client.post("/check-image", data=form, headers={"X-User-Id": "clinician"})
        body = await response.json()
        assert response.status == 200, body
        assert sorted(p["label"] for p in body["predictions"]) == sorted(LABELS)
        assert abs(sum(p["confidence"] for p in body["predictions"]) - 1.0) < 1e-3
        assert body["model"]["demo"] is True and body["model"]["artifact"] == EXPECTED_ARTIFACT[runtime]
        assert body["model"]["precision"] == "int8" and body["model"]["runtime"] == runtime
    info = await (await client.get("/v1/info")).json()
    assert info["selfcheck"]["max_abs_dp"] <= info["selfcheck"]["allowed"]
    assert info["selfcheck"]["golden_images"] >= 5
