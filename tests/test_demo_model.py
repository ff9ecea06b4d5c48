"""The server end to end on the real demo model that `convert` builds: every runtime, the served path convert measured."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.app import create_app
from appliance.config import parse_config
from appliance.security.auth import ApiKeys
from convert.demo import synthetic_photos

from .conftest import LABELS, encode

INT8 = {"onnxruntime": "onnx-int8", "openvino": "openvino-int8"}


def fastest_passing(demo_model_dir: Path, runtime: str) -> str:
    """What convert measured as the fastest f32 path that met the bar on this runtime."""
    paths = json.loads((demo_model_dir / "model.json").read_text())["served_paths"]
    passing = {k: p for k, p in paths.items() if p["passed"] and p["runtime"] == runtime and p["inference_precision"] == "f32"}
    return min(passing, key=lambda k: passing[k]["ms_per_image"])


@pytest.mark.parametrize("runtime", sorted(INT8))
@pytest.mark.parametrize("artifact", ["auto", "int8"])
async def test_demo_model_serves_after_its_self_check(
    aiohttp_client: Any, demo_model_dir: Path, tmp_path: Path, runtime: str, artifact: str
) -> None:
    config = parse_config({
        # Served by convert's figures, as before a box proves its paths (tests/test_proof_demo.py proves them).
        "model": {"path": str(demo_model_dir.parent), "artifact": INT8[runtime] if artifact == "int8" else "auto",
                  "prove_paths": False},
        "runtime": {"backend": runtime},
        "storage": {"root": str(tmp_path / "data")},
    })
    # The demo's INT8 meets the bar (tests/test_convert_demo.py): auto serves the fastest path that
    # met it, whatever its artifact; INT8 named in model.artifact is served as a passing path, undegraded.
    expected = fastest_passing(demo_model_dir, runtime) if artifact == "auto" else None
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
        assert body["model"]["demo"] is True and body["model"]["runtime"] == runtime
        assert "degraded" not in body["model"]
        if expected is not None:
            assert body["model"]["served_path"] == expected
        else:
            assert body["model"]["artifact"] == INT8[runtime] and body["model"]["precision"] == "int8"
    info = await (await client.get("/v1/info")).json()
    assert info["selfcheck"]["max_abs_dp"] <= info["selfcheck"]["allowed"]
    assert info["selfcheck"]["golden_images"] >= 5
