"""The demo proves its paths on the CPU that serves it: safe first, fast once proven, never a path that fails here.

Two versions, two outcomes (appliance/inference/proof.py):
- the demo as convert built it, whose INT8 holds on every instruction set (tests/test_int8_isa.py):
  the box serves FP32 from its first request, proves every path, and switches to INT8
  under load without a failed request;
- the same version with its OpenVINO INT8 replaced by the recipe before issue 20 (8-bit
  weights, the stem quantized), its files rehashed and convert's figures left as they were,
  as if converted on an AVX-512 VNNI machine where that recipe passed. Served with
  oneDNN capped at AVX2 (a no-op on an AVX2 CPU, an AVX2 box on a newer one), whose
  kernels saturate: it passes its golden self-check, fails its proof, and is never served.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from appliance.app import create_app
from appliance.config import parse_config
from appliance.inference.lifecycle import PROVEN
from appliance.modeldir import MANIFEST, MANIFEST_DIGEST
from appliance.security.auth import ApiKeys
from convert.demo import DEMO_SEED, PHOTO_SIZE, synthetic_photos

from .conftest import encode
from .test_serve import free_port, post_image, running, wait_ready

CALIBRATION = 32


def get_info(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=30) as response:
        return json.loads(response.read())


async def test_the_demo_switches_to_int8_once_proven_here_with_no_failed_request(
        aiohttp_client: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((demo_model_dir / MANIFEST).read_text())
    precision = {key: a["precision"] for key, a in manifest["artifacts"].items()}
    config = parse_config({"model": {"path": str(demo_model_dir.parent), "cache_dir": str(tmp_path / "machine")},
                           "runtime": {"backend": "openvino"}, "storage": {"root": str(tmp_path / "data")}})
    client = await aiohttp_client(create_app(config, api_keys=ApiKeys.of({})))
    first = await (await client.get("/v1/info")).json()
    assert first["served_path"]["proof"]["state"] == "pending"
    assert precision[first["served_path"]["artifact"]] == "fp32"
    assert first["served_path"]["why"].startswith("safe first: proving 4 path(s) on this machine's 100 verification photos")
    photos = [encode(p) for p in synthetic_photos(6, seed=321, size=(1200, 900))]
    served: list[str] = []
    statuses: list[int] = []
    done = asyncio.Event()

    async def clinician(offset: int) -> None:
        k = offset
        while not done.is_set():
            form = aiohttp.FormData()
            form.add_field("file", io.BytesIO(photos[k % len(photos)]), filename="a.jpg", content_type="image/jpeg")
            response = await client.post("/check-image", data=form, headers={"X-User-Id": f"clinician{offset}"})
            statuses.append(response.status)
            served.append((await response.json())["model"]["served_path"])
            k += 2

    load = [asyncio.create_task(clinician(k)) for k in range(2)]
    deadline = time.monotonic() + 600
    while True:
        info = await (await client.get("/v1/info")).json()
        if info["model"]["last_reload"] is not None:
            break
        assert time.monotonic() < deadline, info["served_path"]["proof"]
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # requests go on across the swap and after it
    done.set()
    await asyncio.gather(*load)
    assert info["model"]["last_reload"]["trigger"] == PROVEN and info["model"]["last_reload"]["result"] == "ok"
    proof = info["served_path"]["proof"]
    assert proof["state"] == "proven" and sorted(proof["paths"]) == sorted(
        k for k, p in manifest["served_paths"].items() if p["passed"] and p["runtime"] == "openvino"
        and p["inference_precision"] == "f32")
    assert all(p["passed_here"] for p in proof["paths"].values()), proof["paths"]
    assert precision[info["served_path"]["artifact"]] == "int8"
    assert set(statuses) == {200}
    assert precision[served[0].split("/")[0]] == "fp32" and precision[served[-1].split("/")[0]] == "int8"
    switch = next(i for i, key in enumerate(served) if precision[key.split("/")[0]] == "int8")
    assert all(precision[key.split("/")[0]] == "int8" for key in served[switch:])  # no flapping back


def old_recipe_version(demo_model_dir: Path, root: Path) -> Path:
    """A copy of the demo whose openvino-int8 is the recipe before issue 20, its convert figures kept."""
    from convert.images import jpeg_bytes, reference_tensor
    from convert.openvino import convert_ir
    from convert.quantize import Quantizer, Variant

    version = Path(shutil.copytree(demo_model_dir, root / "demo" / "1"))
    work = root / "work"
    work.mkdir()
    calibration = np.stack([reference_tensor(io.BytesIO(jpeg_bytes(image)))
                            for image in synthetic_photos(CALIBRATION, DEMO_SEED + 3, PHOTO_SIZE)])
    quantizer = Quantizer(version / "model.onnx", work, calibration)
    onnx = quantizer.quantize("MinMax", [], Variant(activations="QInt8", reduce_range=False, float_stem=False))
    manifest = json.loads((version / MANIFEST).read_text())
    artifact = manifest["artifacts"]["openvino-int8"]
    for made, file in zip(convert_ir(onnx, work / "ir" / "model.xml"), artifact["files"], strict=True):
        shutil.copyfile(made, version / file)
        artifact["files"][file] = hashlib.sha256((version / file).read_bytes()).hexdigest()
    artifact["sha256"] = artifact["files"][artifact["file"]]
    text = json.dumps(manifest, indent=2).encode()
    (version / MANIFEST).write_bytes(text)
    (version / MANIFEST_DIGEST).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")
    return version


def test_int8_that_passed_elsewhere_and_fails_here_is_never_served(demo_model_dir: Path, tmp_path: Path) -> None:
    version = old_recipe_version(demo_model_dir, tmp_path)
    recorded = json.loads((version / MANIFEST).read_text())["served_paths"]
    assert recorded["openvino-int8/fast"]["passed"] is True  # what the converting machine wrote
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {port}\n[model]\npath = "{version}"\ncache_dir = "{tmp_path / "machine"}"\n'
                      f'[storage]\nroot = "{tmp_path / "data"}"\n[runtime]\nbackend = "openvino"\n')
    photos = [encode(p) for p in synthetic_photos(3, seed=654, size=(1200, 900))]
    with running(config, ONEDNN_MAX_CPU_ISA="AVX2") as proc:
        wait_ready(proc, port, timeout_s=180)
        served = [post_image(port, photos[0])["model"]]
        deadline = time.monotonic() + 600
        while (info := get_info(port))["model"]["last_reload"] is None:
            assert time.monotonic() < deadline, info["served_path"]["proof"]
            served.append(post_image(port, photos[len(served) % len(photos)])["model"])
            time.sleep(0.5)
        served.append(post_image(port, photos[1])["model"])
    assert all(m["precision"] == "fp32" and "degraded" not in m for m in served), served
    assert {m["served_path"] for m in served} <= {k for k in recorded if k.startswith("openvino-fp32/")}
    proof = info["served_path"]["proof"]
    int8 = proof["paths"]["openvino-int8/fast"]
    assert int8["passed_here"] is False and int8["passed_converting_machine"] is True
    assert int8["figures_here"]["max_abs_dp"] > 0.05 or int8["figures_here"]["top1_agreement"] < 0.99
    assert int8["converting_machine"].startswith("top-1 ")  # convert's figures, as recorded
    assert proof["fingerprint"]["isa_cap"] == "AVX2"
    assert all(proof["paths"][k]["passed_here"] for k in proof["paths"] if k.startswith("openvino-fp32/"))
    assert info["model"]["last_reload"]["trigger"] == PROVEN
    assert info["served_path"]["artifact"] == "openvino-fp32"
    log = (tmp_path / "server.log").read_text()
    assert (f"proof: openvino-int8/fast passed on the converting machine ({int8['converting_machine']}) but FAILS on "
            f"this CPU ({int8['here']}): never served here") in log
