"""Proving served paths on this CPU (appliance/inference/proof.py), on the tiny model with a verification set.

The tiny model's paths differ only by decode: its fast decode reads these photos at
half scale and moves a probability by 1e-5 to 1e-4, the exact one by under 4e-6. With
a bar of 1e-5 the fast paths fail on any CPU and the exact ones pass, which makes
"passed at convert, fails here" deterministic without a second CPU. The demo's INT8
on another CPU's kernels is tests/test_proof_demo.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.app import create_app
from appliance.config import parse_config
from appliance.errors import ModelError
from appliance.inference.lifecycle import PROVEN
from appliance.inference.model import read_manifest
from appliance.inference.proof import ISA_CAP_VARIABLE, find_proof, fingerprint, proof_file
from appliance.inference.runtimes import create_runtime
from appliance.keys import MODELS
from appliance.security.auth import ApiKeys

from .conftest import encode, photo, reference_probabilities, rewrite_manifest

PHOTOS = 6
BAR = {"top1_agreement": 0.99, "max_abs_dp": 1e-5, "per_class": True}


def with_verification_set(version: Path, bar: dict[str, Any] = BAR) -> list[Path]:
    """Give a tiny model version a verification set of 1400 px photos (the fast decode reads them at 1/2)."""
    (version / "verification").mkdir()
    entries, files = [], []
    for k in range(PHOTOS):
        data = encode(photo(1400 + 60 * k, 1050, seed=20 + k))
        file = version / "verification" / f"{k:04d}.jpeg"
        file.write_bytes(data)
        files.append(file)
        entries.append({"file": f"verification/{k:04d}.jpeg", "sha256": hashlib.sha256(data).hexdigest(),
                        "probabilities": reference_probabilities(data).tolist()})

    def add(manifest: dict[str, Any]) -> None:
        manifest["verification"] = {"photos": PHOTOS, "source": "held-out", "bar": bar, "set": entries}

    rewrite_manifest(version, add)
    return files


@pytest.fixture
def proven_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    version = Path(shutil.copytree(tiny_model_dir, tmp_path / "model" / "1"))
    with_verification_set(version)
    return version


def config_for(version: Path, tmp_path: Path, **model: Any) -> Any:
    return parse_config({"model": {"path": str(version), "cache_dir": str(tmp_path / "machine"), **model},
                         "runtime": {"backend": "openvino"}, "storage": {"root": str(tmp_path / "data")},
                         "inference": {"max_wait_ms": 1.0}})


async def wait_for(client: Any, state: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """/v1/info once the proof is in `state` and no reload is running."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        info = await (await client.get("/v1/info")).json()
        reload = info["model"]["last_reload"]
        if info["served_path"]["proof"]["state"] == state and (state != "proven" or reload is not None):
            return info
        assert asyncio.get_running_loop().time() < deadline, info["served_path"]["proof"]
        await asyncio.sleep(0.05)


async def check_image(client: Any, seed: int) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("file", encode(photo(1400, 1050, seed=seed)), filename="a.jpg", content_type="image/jpeg")
    response = await client.post("/check-image", data=form, headers={"X-User-Id": "clinician"})
    body = await response.json()
    assert response.status == 200, body
    return body


async def test_a_path_that_fails_here_is_never_served_once_proven_and_the_proof_is_cached(
        aiohttp_client: Any, proven_copy: Path, tmp_path: Path) -> None:
    config = config_for(proven_copy, tmp_path)
    client = await aiohttp_client(create_app(config, api_keys=ApiKeys.of({})))
    info = await wait_for(client, "proven")
    proof = info["served_path"]["proof"]
    assert info["model"]["last_reload"]["trigger"] == PROVEN and info["model"]["last_reload"]["result"] == "ok"
    assert sorted(proof["paths"]) == ["onnx-fp32/exact", "onnx-fp32/fast", "openvino-fp32/exact", "openvino-fp32/fast"]
    for key, path in proof["paths"].items():
        assert path["passed_here"] is key.endswith("/exact"), (key, path)
        assert path["passed_converting_machine"] is True
        assert path["figures_here"]["images"] == PHOTOS
        assert path["here"].startswith("top-1 100.00%, max |dp| ")
    assert proof["paths"]["openvino-fp32/fast"]["figures_here"]["max_abs_dp"] > 1e-5
    assert info["served_path"]["key"] == "openvino-fp32/exact"
    assert info["served_path"]["why"].endswith(f"; proven on this machine at {json.loads(Path(proof['file']).read_text())['measured_at']} on 6 verification photos")
    body = await check_image(client, seed=1)
    assert body["model"]["served_path"] == "openvino-fp32/exact" and "degraded" not in body["model"]
    cached = json.loads(Path(proof["file"]).read_text())
    assert cached["fingerprint"] == proof["fingerprint"] and cached["photos"] == PHOTOS
    await client.close()

    # A restart on the same machine reads the proof: the failing path is not served from the first request.
    client = await aiohttp_client(create_app(config, api_keys=ApiKeys.of({})))
    info = await (await client.get("/v1/info")).json()
    assert info["served_path"]["proof"]["state"] == "proven"
    assert info["served_path"]["key"] == "openvino-fp32/exact"
    assert info["model"]["last_reload"] is None
    assert (await check_image(client, seed=2))["model"]["served_path"] == "openvino-fp32/exact"


def test_another_instruction_set_cap_or_runtime_setting_is_another_machine(
        proven_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = read_manifest(proven_copy)
    config = config_for(proven_copy, tmp_path)
    runtime = create_runtime("openvino", config.runtime.selected)
    monkeypatch.delenv(ISA_CAP_VARIABLE, raising=False)
    native = fingerprint(runtime, config.runtime.selected)
    monkeypatch.setenv(ISA_CAP_VARIABLE, "SSE41")
    capped = fingerprint(runtime, config.runtime.selected)
    assert capped["isa_cap"] == "SSE41" and native["isa_cap"] == ""
    other = config_for(proven_copy, tmp_path, artifact="openvino-fp32")  # model settings are not the runtime's
    assert fingerprint(runtime, other.runtime.selected) == capped
    threads = parse_config({"runtime": {"backend": "openvino", "openvino": {"threads": 1}}}).runtime.selected
    assert fingerprint(runtime, threads)["settings_sha256"] != capped["settings_sha256"]
    files = {proof_file(tmp_path, manifest, f) for f in (native, capped)}
    assert len(files) == 2
    assert native["runtime"] == "openvino" and native["runtime_version"]
    # Nothing cached for this machine: pending, every candidate named.
    proof = find_proof(manifest, list(manifest.served_paths), capped, tmp_path)
    assert proof.state == "pending" and len(proof.pending) == len(manifest.served_paths)
    assert find_proof(manifest, [], capped, None).state == "off"


async def test_a_tampered_verification_photo_stops_the_proof_and_the_first_path_serves_on(
        aiohttp_client: Any, proven_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (proven_copy / "verification" / "0002.jpeg").write_bytes(encode(photo(1400, 1050, seed=99)))
    with caplog.at_level(logging.ERROR, logger="appliance.inference.lifecycle"):
        client = await aiohttp_client(create_app(config_for(proven_copy, tmp_path), api_keys=ApiKeys.of({})))
        for _ in range(400):
            if any("proving tiny v1" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    (record,) = [r.getMessage() for r in caplog.records if "proving tiny v1" in r.getMessage()]
    expected = json.loads((proven_copy / "model.json").read_text())["verification"]["set"][2]["sha256"]
    actual = hashlib.sha256((proven_copy / "verification" / "0002.jpeg").read_bytes()).hexdigest()
    assert record == (f"proving tiny v1 on this machine failed (ModelError: {proven_copy / 'verification/0002.jpeg'}: "
                      f"sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…); "
                      f"the FP32 path serves on until a reload")
    info = await (await client.get("/v1/info")).json()
    assert info["served_path"]["proof"]["state"] == "pending"
    assert info["served_path"]["why"].startswith("safe first: proving 4 path(s) on this machine's 6 verification photos")
    assert (await check_image(client, seed=3))["model"]["served_path"] == info["served_path"]["key"]


async def test_when_no_path_passes_here_the_first_serves_on_flagged_degraded(
        aiohttp_client: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    version = Path(shutil.copytree(tiny_model_dir, tmp_path / "model" / "1"))
    with_verification_set(version, {**BAR, "max_abs_dp": 1e-9})
    client = await aiohttp_client(create_app(config_for(version, tmp_path), api_keys=ApiKeys.of({})))
    info = await wait_for(client, "proven")
    reload = info["model"]["last_reload"]
    assert reload["trigger"] == PROVEN and reload["result"] == "refused"
    assert reload["reason"].startswith(f"no served path of {version} met the bar for runtime.backend = \"openvino\"")
    assert not any(p["passed_here"] for p in info["served_path"]["proof"]["paths"].values())
    body = await check_image(client, seed=4)
    assert body["model"]["degraded"] is True


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s[0].pop("sha256"), "not a valid manifest (ValueError: verification verification/0000.jpeg has no sha256)"),
    (lambda s: s[1].update(probabilities=[1.0]), "verification verification/0001.jpeg has 1 probabilities for 7 labels"),
    (lambda s: s[0].update(file="../../etc/passwd"), "not a valid manifest (ValueError: unsafe file name '../../etc/passwd')"),
])
def test_a_bad_verification_set_is_refused_by_name(proven_copy: Path, change: Any, message: str) -> None:
    rewrite_manifest(proven_copy, lambda m: change(m["verification"]["set"]))
    with pytest.raises(ModelError) as refused:
        read_manifest(proven_copy)
    assert refused.value.detail == f"{proven_copy / 'model.json'}: {message}"


# -- the live parity watch ------------------------------------------------------------------------


async def test_the_live_watch_falls_back_to_the_reference_path_when_the_served_path_disagrees(
        aiohttp_client: Any, proven_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Served by convert's figures (no proof): the fast decode, which on these 1400 px photos moves a
    # probability by up to 1e-4 from the reference path (the exact decode), over the bar's 1e-5.
    config = config_for(proven_copy, tmp_path, prove_paths=False, watch_every=2, watch_window=3)
    client = await aiohttp_client(create_app(config, api_keys=ApiKeys.of({})))
    info = await (await client.get("/v1/info")).json()
    assert info["served_path"]["key"] == "openvino-fp32/fast"
    assert info["served_path"]["watch"] == {
        "state": "watching", "every": 2, "window": 3, "reference": "openvino-fp32/exact", "samples": 0,
        "in_window": 0, "top1_agreement": None, "max_abs_dp": None, "dropped": 0, "fell_back": None}
    served = []
    with caplog.at_level(logging.WARNING, logger="appliance.inference.proof"):
        for seed in range(40):
            served.append((await check_image(client, seed=20 + seed % 6))["model"]["served_path"])
            watch = (await (await client.get("/v1/info")).json())["served_path"]["watch"]
            if watch["state"] == "fell back" and served[-1] == "openvino-fp32/exact":
                break
            await asyncio.sleep(0.2)  # an idle moment for the watch
    info = await (await client.get("/v1/info")).json()
    watch = info["served_path"]["watch"]
    assert watch["state"] == "fell back" and watch["samples"] >= 3
    assert watch["fell_back"].startswith("openvino-fp32/fast agreed with the reference path openvino-fp32/exact on "
                                         "100.0% of the last 3 sampled photos, max |dp| ")
    assert watch["fell_back"].endswith(" (bar: top-1 >= 99%, max |dp| <= 1e-05)")
    assert info["served_path"]["key"] == "openvino-fp32/exact"
    assert info["served_path"]["why"].startswith("the reference path, after the live parity watch fell back")
    assert info["model"]["last_reload"]["trigger"] == "live parity watch"
    assert served[0] == "openvino-fp32/fast" and served[-1] == "openvino-fp32/exact"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("live parity watch:")]
    assert lines == [f"live parity watch: {watch['fell_back']}: falling back to openvino-fp32/exact until a reload"]
    metrics = await (await client.get("/metrics")).text()
    assert "appliance_parity_fell_back 1.0" in metrics
    assert f"appliance_parity_samples_total {float(watch['samples'])}" in metrics

    # An operator's reload of the same version ends the fallback.
    outcome = await client.app[MODELS].reload("SIGHUP")
    assert outcome.result == "ok"
    info = await (await client.get("/v1/info")).json()
    assert info["served_path"]["key"] == "openvino-fp32/fast" and info["served_path"]["watch"]["state"] == "watching"
    assert info["served_path"]["watch"]["in_window"] == 0


async def test_the_watch_has_nothing_to_do_on_the_reference_path_and_can_be_off(
        aiohttp_client: Any, proven_copy: Path, tmp_path: Path) -> None:
    config = config_for(proven_copy, tmp_path, prove_paths=False, watch_every=1, watch_window=1)
    client = await aiohttp_client(create_app(
        dataclasses.replace(config, imaging=dataclasses.replace(config.imaging, decode="exact")),
        api_keys=ApiKeys.of({})))
    await check_image(client, seed=5)
    watch = (await (await client.get("/v1/info")).json())["served_path"]["watch"]
    assert watch["state"] == "reference" and watch["samples"] == 0
    await client.close()
    client = await aiohttp_client(create_app(config_for(proven_copy, tmp_path, prove_paths=False, watch_every=0),
                                             api_keys=ApiKeys.of({})))
    await check_image(client, seed=5)
    watch = (await (await client.get("/v1/info")).json())["served_path"]["watch"]
    assert watch["state"] == "off" and watch["samples"] == 0
    assert "appliance_parity_top1_agreement" not in await (await client.get("/metrics")).text()


def test_a_damaged_proof_file_is_proven_again(proven_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = read_manifest(proven_copy)
    config = config_for(proven_copy, tmp_path)
    machine = fingerprint(create_runtime("openvino", config.runtime.selected), config.runtime.selected)
    file = proof_file(tmp_path, manifest, machine)
    file.write_text(json.dumps({"measured_at": "x", "photos": 6, "paths": {
        p.key: {"passed": "yes", "per_class": {}} for p in manifest.served_paths}}))
    with caplog.at_level(logging.WARNING, logger="appliance.inference.proof"):
        proof = find_proof(manifest, list(manifest.served_paths), machine, tmp_path)
    assert proof.state == "pending" and proof.file == file
    assert [r.getMessage() for r in caplog.records if r.name == "appliance.inference.proof"] == [
        f"cannot read the proof cached in {file} (TypeError: a path's result is not what prove() writes): proving again"]
