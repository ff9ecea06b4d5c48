"""Swapping the served model on a running server: SIGHUP, `appliance reload`, the repository API (issue 14).

The process tests run the real `appliance serve` with four clients posting real
JPEGs the whole time: a swap must fail none of them, and each answer names the
version that computed it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.keys import MODELS
from appliance.security.auth import ApiKeys, Role

from .buckets import Bucket, Server
from .conftest import encode, photo, rewrite_manifest
from .liveserver import serve_in_thread
from .test_serve import ROOT, port_of, post_image, running, wait_ready, write_config
from .test_sync_models import model_config, publish

CLIENTS = 4


def add_version(model_root: Path, source: Path, version: int, change: Callable[[Path], None] | None = None) -> Path:
    """Drop version `version` (a copy of `source`, changed by `change`) into `model_root` in one rename."""
    staging = model_root / f".staging-{version}"
    shutil.copytree(source, staging)
    rewrite_manifest(staging, lambda m: m.update(version=version))
    if change is not None:
        change(staging)
    return staging.rename(model_root / str(version))


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    [value] = [line.split()[-1] for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(value)


class Load:
    """CLIENTS threads classifying real JPEGs back to back until stopped; every answer's version and every failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.images = [encode(photo(seed=seed)) for seed in range(CLIENTS)]
        self.versions: list[list[str]] = [[] for _ in range(CLIENTS)]
        self.failures: list[str] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, i: int) -> None:
        while not self.stopped.is_set():
            try:
                self.versions[i].append(post_image(self.port, self.images[i])["model"]["version"])
            except Exception as exc:  # any failure counts against the swap
                self.failures.append(f"client {i}: {exc!r}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(30)

    def answered(self) -> int:
        return sum(len(v) for v in self.versions)

    def wait_for_answers(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        start = self.answered()
        while self.answered() < start + count:
            assert time.monotonic() < deadline and not self.failures, self.failures
            time.sleep(0.05)


def wait_for_reload(port: int, timeout_s: float = 60) -> dict[str, Any]:
    """/v1/info's model section once a reload has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        model = get_json(port, "/v1/info")["model"]
        if model["last_reload"] is not None:
            return model
        time.sleep(0.1)
    raise AssertionError("no reload ended in time")


@pytest.fixture
def model_root(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model's directory holding version 1 of the tiny model."""
    root = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, root / "1")
    return root


def test_sighup_swaps_to_a_new_version_under_load_without_a_failed_request(
        tmp_path: Path, model_root: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, model_root, "sqlite")
    port = port_of(config)
    with running(config) as proc:
        wait_ready(proc, port)
        with Load(port) as load:
            load.wait_for_answers(20)
            add_version(model_root, tiny_model_dir, 2)
            sighup = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            model = wait_for_reload(port)
            assert model["version"] == "2" and time.monotonic() - sighup < 30
            load.wait_for_answers(20)
        assert load.failures == []
        for versions in load.versions:  # each client's answers: v1, then v2 from the swap on, never back
            assert versions == sorted(versions, key=int) and set(versions) <= {"1", "2"}
        assert {"1", "2"} <= {v for versions in load.versions for v in versions}
        last = model["last_reload"]
        assert (last["trigger"], last["version"], last["result"]) == ("SIGHUP", "2", "ok")
        assert re.fullmatch(r"serving openvino-fp32/\w+ from \S+/tiny/2 \(ready in [\d.]+ s; self-check max "
                            r"\|dp\| \S+\); v1 retired", last["reason"]), last["reason"]
        assert get_json(port, "/v1/info")["model"]["available_version"] == "2"
        assert metric(port, 'appliance_model_reloads_total{result="ok"}') == 1
        assert metric(port, 'appliance_model_reloads_total{result="refused"}') == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = (tmp_path / "server.log").read_text()
    assert "model reload (SIGHUP): ok v2: serving openvino-fp32/" in log
    assert "model v1 closed: its last request was answered" in log
    classified = [json.loads(line) for line in log.splitlines() if '"route": "/check-image"' in line]
    assert len(classified) == load.answered()  # each classification's log line names its model
    assert {(c["model"], c["model_version"], c["served_path"]) for c in classified} == {
        ("tiny", "1", "openvino-fp32/fast"), ("tiny", "2", "openvino-fp32/fast")}


def _tamper_artifact(version: Path) -> None:
    with open(version / "openvino" / "fp32" / "model.bin", "ab") as file:
        file.write(b"\0")


def _golden_mismatch(version: Path) -> None:
    rewrite_manifest(version, lambda m: m["golden"][0].update(probabilities=[1, 0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize(("change", "reason"), [
    (_tamper_artifact, r"\S+/tiny/2/openvino/fp32/model\.bin: sha256 \w+… does not match the manifest's \w+…"),
    (_golden_mismatch, r"self-check failed for openvino-fp32/\w+ on golden/0\.jpg: max \|dp\| .*; refusing to serve: .*"),
], ids=["tampered-artifact", "golden-mismatch"])
def test_a_broken_new_version_is_refused_and_the_old_one_keeps_serving(
        tmp_path: Path, model_root: Path, tiny_model_dir: Path, change: Callable[[Path], None], reason: str) -> None:
    config = write_config(tmp_path, model_root, "sqlite")
    port = port_of(config)
    with running(config) as proc:
        wait_ready(proc, port)
        with Load(port) as load:
            load.wait_for_answers(12)
            add_version(model_root, tiny_model_dir, 2, change)
            proc.send_signal(signal.SIGHUP)
            model = wait_for_reload(port)
            load.wait_for_answers(12)
        assert load.failures == []
        assert {v for versions in load.versions for v in versions} == {"1"}
        assert model["version"] == "1"
        last = model["last_reload"]
        assert (last["trigger"], last["version"], last["result"]) == ("SIGHUP", "2", "refused")
        assert re.fullmatch(reason + r"; still serving v1", last["reason"]), last["reason"]
        assert metric(port, 'appliance_model_reloads_total{result="refused"}') == 1
        assert metric(port, 'appliance_model_reloads_total{result="ok"}') == 0
    [line] = [line for line in (tmp_path / "server.log").read_text().splitlines() if "model reload (SIGHUP)" in line]
    assert "refused v2: " in line and "still serving v1" in line


def test_rollback_is_pin_and_appliance_reload(tmp_path: Path, model_root: Path, tiny_model_dir: Path) -> None:
    add_version(model_root, tiny_model_dir, 2)
    config = write_config(tmp_path, model_root, "sqlite")
    port = port_of(config)

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance", "reload", "--config", str(config)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    with running(config) as proc:
        wait_ready(proc, port)
        assert post_image(port, encode(photo()))["model"]["version"] == "2"
        config.write_text(config.read_text().replace("[model]\n", '[model]\npin_version = "1"\n'))
        done = reload()
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout == (f"sent SIGHUP to the server (pid {proc.pid}): it reloads the model in the background; "
                               "the outcome is in its log and in /v1/info (model.last_reload)\n")
        model = wait_for_reload(port)
        assert (model["version"], model["last_reload"]["result"]) == ("1", "ok")
        assert post_image(port, encode(photo()))["model"]["version"] == "1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    done = reload()  # the server is gone, and so is its pid file
    assert done.returncode == 1
    assert done.stderr == (f"appliance: error: no running server found: {tmp_path / 'data' / 'appliance.pid'} does "
                           "not exist (is `appliance serve` running with this config's storage.root? Under systemd: "
                           "systemctl reload appliance)\n")


def test_a_pin_naming_no_version_is_refused(tmp_path: Path, model_root: Path) -> None:
    config = write_config(tmp_path, model_root, "sqlite")
    port = port_of(config)
    with running(config) as proc:
        wait_ready(proc, port)
        config.write_text(config.read_text().replace("[model]\n", '[model]\npin_version = "7"\n'))
        proc.send_signal(signal.SIGHUP)
        model = wait_for_reload(port)
    assert model["version"] == "1"
    assert (model["last_reload"]["result"], model["last_reload"]["version"]) == ("refused", "")
    assert model["last_reload"]["reason"] == f"model.pin_version: '7' is not a version in {model_root} (has: 1)"


KEYS = ApiKeys.of({"phones": "k-phones", "boss": "k-boss"}, roles={"boss": Role.ADMIN})


async def test_repository_api_loads_with_an_admin_key_only(
        aiohttp_client: Any, make_config: Any, model_root: Path, tiny_model_dir: Path) -> None:
    app = create_app(make_config(model__path=str(model_root)), api_keys=KEYS)
    client: TestClient = await aiohttp_client(app)
    admin = {"X-API-Key": "k-boss"}

    for path in ("/v2/repository/index", "/v2/repository/models/tiny/load", "/v2/repository/models/tiny/unload"):
        response = await client.post(path)
        assert (response.status, await response.json()) == (401, {"error": "Invalid API key"})
        response = await client.post(path, headers={"X-API-Key": "k-phones"})
        assert (response.status, await response.json()) == (
            403, {"error": "Only an admin key may change the served model (the repository API)"})

    add_version(model_root, tiny_model_dir, 2)
    response = await client.post("/v2/repository/index", headers=admin)
    assert (response.status, await response.json()) == (200, [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
        {"name": "tiny", "version": "2", "state": "UNAVAILABLE", "reason": "not loaded"}])
    response = await client.post("/v2/repository/models/melanoma-net/load", headers=admin)
    assert (response.status, await response.json()) == (
        404, {"error": "Unknown model 'melanoma-net'; this appliance serves 'tiny'"})

    response = await client.post("/v2/repository/models/tiny/load", headers=admin)
    assert (response.status, await response.json()) == (200, {})
    assert app[MODELS].current.manifest.version == "2"
    response = await client.get("/v2/models/tiny", headers=admin)
    assert (await response.json())["versions"] == ["2"]
    response = await client.post("/v2/repository/models/tiny/load", headers=admin)  # nothing new: nothing swapped
    assert (response.status, await response.json()) == (200, {})
    last = app[MODELS].last_reload
    assert last is not None and last.result == "unchanged"

    response = await client.post("/v2/repository/models/tiny/unload", headers=admin)
    assert (response.status, await response.json()) == (409, {
        "error": "Model 'tiny' is the only model served and cannot be unloaded; to serve another version, set "
                 "model.pin_version and load it (POST .../load)"})

    add_version(model_root, tiny_model_dir, 3, _golden_mismatch)
    response = await client.post("/v2/repository/models/tiny/load", headers=admin)
    body = await response.json()
    assert response.status == 422 and body["error"].startswith("Version 3 refused: self-check failed for ")
    assert body["error"].endswith("; still serving v2")
    assert app[MODELS].current.manifest.version == "2"


def test_tritons_own_client_drives_the_repository_api(make_config: Any, model_root: Path,
                                                     tiny_model_dir: Path) -> None:
    """tritonclient's index, load and unload calls, as a fleet's tooling would make them, with an admin key."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    app = create_app(make_config(model__path=str(model_root)), api_keys=KEYS)
    admin = {"X-API-Key": "k-boss"}
    with serve_in_thread(app) as address, triton.InferenceServerClient(address) as client:
        with pytest.raises(InferenceServerException, match="Only an admin key may change the served model"):
            client.load_model("tiny", headers={"X-API-Key": "k-phones"})
        add_version(model_root, tiny_model_dir, 2)
        assert client.get_model_repository_index(headers=admin) == [
            {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
            {"name": "tiny", "version": "2", "state": "UNAVAILABLE", "reason": "not loaded"}]
        client.load_model("tiny", headers=admin)
        assert client.get_model_metadata("tiny", headers=admin)["versions"] == ["2"]
        assert client.is_model_ready("tiny", "2", headers=admin)
        with pytest.raises(InferenceServerException, match="is the only model served and cannot be unloaded"):
            client.unload_model("tiny", headers=admin)


async def test_repository_api_with_no_keys_answers_loopback(aiohttp_client: Any, make_config: Any,
                                                            model_root: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(model__path=str(model_root)),
                                                         api_keys=ApiKeys()))
    response = await client.post("/v2/repository/models/tiny/load")
    assert (response.status, await response.json()) == (200, {})
    # From loopback, but on behalf of someone elsewhere: a proxy on this machine, or a web page's script.
    for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"},
                   {"Origin": "https://example.org"}):
        response = await client.post("/v2/repository/models/tiny/load", headers=header)
        assert (response.status, await response.json()) == (403, {
            "error": "With no API keys configured the repository API answers only on this machine; configure an "
                     "admin key (auth.keys_file, name:key:admin)"})


def test_systemd_hears_a_refused_reload_in_status(tmp_path: Path, model_root: Path, tiny_model_dir: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@appliance-lifecycle-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + address[1:])
    sock.settimeout(60)
    config = write_config(tmp_path, model_root, "sqlite")
    port = port_of(config)
    ready = f"Ready: tiny v1 (openvino-fp32/fast, DEMO) on openvino/CPU at http://127.0.0.1:{port}"
    with sock, running(config, NOTIFY_SOCKET=address) as proc:
        assert sock.recv(4096).decode().startswith("STATUS=Starting")
        assert sock.recv(4096).decode().split("\n") == ["READY=1", f"STATUS={ready}"]
        add_version(model_root, tiny_model_dir, 2, _golden_mismatch)
        proc.send_signal(signal.SIGHUP)
        reloading, usec, status = sock.recv(4096).decode().split("\n")
        assert (reloading, status) == ("RELOADING=1", "STATUS=Reloading (SIGHUP): verifying, loading and "
                                       "self-checking the model; the current version serves meanwhile")
        assert 0 < int(usec.removeprefix("MONOTONIC_USEC=")) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        done, status = sock.recv(4096).decode().split("\n")
        assert done == "READY=1"
        assert status.startswith(f"STATUS={ready}; reload of v2 REFUSED: self-check failed for openvino-fp32/fast on "
                                 "golden/0.jpg: ")
        assert status.endswith("; still serving v1")
        shutil.rmtree(model_root / "2")
        add_version(model_root, tiny_model_dir, 3)
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096).decode().startswith("RELOADING=1\n")
        assert sock.recv(4096).decode().split("\n") == ["READY=1", f"STATUS={ready.replace('v1', 'v3')}"]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_bucket_rollout_serves_a_new_version_after_the_next_poll_and_survives_the_bucket_going_away(
        aiohttp_client: Any, make_config: Any, tmp_path: Path, tiny_model_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    server = Server("s3", tmp_path / "moto")  # this test's own: it stops it
    server.start()
    try:
        bucket = Bucket(server, "fleet-models", tmp_path)
        bucket.create()
        versions = tmp_path / "versions"
        for version, change in ((1, None), (2, None), (3, _golden_mismatch)):
            add_version(versions, tiny_model_dir, version, change)
        publish(bucket, versions / "1")
        config = model_config(make_config, bucket, tmp_path, model__poll_interval_s=0.2, bucket__timeout_s=2.0)
        app = create_app(config)
        client: TestClient = await aiohttp_client(app)
        lifecycle = app[MODELS]
        assert lifecycle.current.manifest.version == "1"

        publish(bucket, versions / "2")
        await wait_until(lambda: lifecycle.current.manifest.version == "2")
        info = await (await client.get("/v1/info")).json()
        assert (info["model"]["version"], info["model"]["available_version"]) == ("2", "2")
        assert (info["model"]["last_reload"]["trigger"], info["model"]["last_reload"]["result"]) == ("poll", "ok")
        cache = lifecycle.version_dir.parent
        assert json.loads((cache / "verified.json").read_text())["dir"] == lifecycle.version_dir.name

        publish(bucket, versions / "3")  # fails its self-check: refused once, never marked, not fetched again
        await wait_until(lambda: lifecycle.last_reload is not None and lifecycle.last_reload.result == "refused")
        refused = lifecycle.last_reload
        copies = sorted(cache.iterdir())
        with caplog.at_level(logging.DEBUG, logger="appliance.inference.lifecycle"):
            caplog.clear()
            await wait_until(lambda: sum("was refused before; not loaded again" in r.getMessage()
                                         for r in caplog.records) >= 3)
        assert sorted(cache.iterdir()) == copies and lifecycle.last_reload == refused
        info = await (await client.get("/v1/info")).json()
        assert (info["model"]["version"], info["model"]["available_version"]) == ("2", "3")
        assert json.loads((cache / "verified.json").read_text())["dir"] == lifecycle.version_dir.name
    finally:
        server.stop()
    # The bucket is gone: polls keep failing to reach it, and the box serves v2 on.
    with caplog.at_level(logging.WARNING, logger="appliance.modelfetch"):
        caplog.clear()
        await wait_until(lambda: sum("cannot fetch" in r.getMessage() for r in caplog.records) >= 3)
    assert lifecycle.current.manifest.version == "2" and lifecycle.last_reload == refused
    assert sorted(cache.iterdir()) == copies
    form = aiohttp.FormData()
    form.add_field("file", encode(photo()), filename="a.jpg", content_type="image/jpeg")
    response = await client.post("/check-image", data=form, headers={"X-User-Id": "u1"})
    assert response.status == 200 and (await response.json())["model"]["version"] == "2"
    metrics = await (await client.get("/metrics")).text()
    assert 'appliance_model_reloads_total{result="ok"} 1.0' in metrics
    assert 'appliance_model_reloads_total{result="refused"} 1.0' in metrics


async def test_every_answer_names_the_model_that_computed_it(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config()))
    form = aiohttp.FormData()
    form.add_field("file", encode(photo()), filename="a.jpg", content_type="image/jpeg")
    response = await client.post("/check-image", data=form, headers={"X-User-Id": "u1"})
    body = await response.json()
    assert response.status == 200 and set(body) == {  # the contract's fields, and only the ones it had
        "status", "message", "blur_score", "predictions", "image_id", "case_id", "user_id", "user_role",
        "low_confidence", "model"}
    named = (response.headers["X-Model-Name"], response.headers["X-Model-Version"], response.headers["X-Served-Path"])
    assert named == (body["model"]["name"], body["model"]["version"], body["model"]["served_path"]) == (
        "tiny", "1", "openvino-fp32/fast")
    payload = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(encode(photo())).decode()]}]}
    response = await client.post("/v2/models/tiny/infer", json=payload)
    body = await response.json()
    assert (body["model_name"], body["model_version"]) == ("tiny", "1")
    assert (response.headers["X-Model-Version"], response.headers["X-Served-Path"]) == ("1", "openvino-fp32/fast")


async def test_auto_serves_the_path_measured_fastest_here_and_caches_the_timings(
        aiohttp_client: Any, make_config: Any, tmp_path: Path) -> None:
    cache = tmp_path / "compiled"
    config = make_config(model__measure_paths=True, runtime__openvino__cache_dir=str(cache))
    app = create_app(config)
    first: TestClient = await aiohttp_client(app)
    [file] = cache.glob("path-timings-tiny-1-*.json")
    timings = json.loads(file.read_text())["ms_per_image"]
    assert set(timings) == {"onnx-fp32/fast", "onnx-fp32/exact", "openvino-fp32/fast", "openvino-fp32/exact"}
    served = app[MODELS].current
    assert timings[served.served.key] == min(timings.values())
    assert served.choice.reason == (f"fastest measured on this machine of 4 path(s) that met the bar: "
                                    f"{min(timings.values()):.1f} ms/img decode + inference (timings in {file})")

    # The next start reads the cache instead of measuring: what it says is fastest is served.
    timings["onnx-fp32/exact"] = 0.01
    file.write_text(json.dumps({"ms_per_image": timings}))
    await first.close()  # the store is one process's at a time
    app = create_app(config)
    client: TestClient = await aiohttp_client(app)
    assert app[MODELS].current.served.key == "onnx-fp32/exact"
    info = await (await client.get("/v1/info")).json()
    assert info["served_path"]["key"] == "onnx-fp32/exact"
    assert info["served_path"]["why"].startswith("fastest measured on this machine of 4 path(s) that met the bar: 0.0 ms")


@pytest.mark.parametrize(("model", "message"), [
    ({"pin_version": "v2"}, "model.pin_version: expected a version directory's number, or \"\" for the highest; got 'v2'"),
    ({"pin_version": "2", "url": "s3://fleet/models/tiny"},
     "model.pin_version: pins a version of model.path; with model.url, point the URL at that version instead "
     "(s3://fleet/models/tiny/2) and set pin_version = \"\""),
    ({"poll_interval_s": -1}, "model.poll_interval_s: expected 0 (off) or a number of seconds; got -1.0"),
    ({"measure_paths": "sometimes"}, "model.measure_paths: expected true or false; got 'sometimes'"),
], ids=["pin-not-a-number", "pin-with-url", "negative-poll", "measure-not-bool"])
def test_model_lifecycle_keys_name_what_is_wrong(model: dict[str, Any], message: str) -> None:
    from appliance.config import parse_config
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"model": model})
    assert caught.value.detail == message


def test_check_config_checks_the_pinned_version(tmp_path: Path, model_root: Path, tiny_model_dir: Path) -> None:
    add_version(model_root, tiny_model_dir, 2)
    config = write_config(tmp_path, model_root, "sqlite")
    config.write_text(config.read_text().replace("[model]\n", '[model]\npin_version = "1"\n'))
    done = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("config OK: model tiny v1 (openvino-fp32/fast, DEMO) from "
                                                           f"{model_root / '1'};"), done.stdout + done.stderr


async def test_during_a_swap_a_batch_holds_one_versions_jobs_and_the_old_one_drains(tiny_model_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from appliance.inference.scheduler import Scheduler

    from .test_scheduler import GatedRuntime

    old, new = GatedRuntime(tiny_model_dir / "model.onnx"), GatedRuntime(tiny_model_dir / "model.onnx")
    with ThreadPoolExecutor(1) as pool:
        scheduler = Scheduler(old, pool, max_batch=8, max_wait_s=0.001, queue_size=16)  # type: ignore[arg-type]
        scheduler.start()
        rng = np.random.default_rng(3)
        tensors = [rng.normal(size=(3, 224, 224)).astype(np.float32) for _ in range(6)]
        first = scheduler.submit(tensors[0], old)  # held at old's gate: the rest queue up behind it
        await asyncio.sleep(0.05)
        rest = [scheduler.submit(t, runtime) for t, runtime in zip(tensors[1:], [old, new, old, new, new], strict=True)]
        drained = asyncio.ensure_future(scheduler.drained(old))  # type: ignore[arg-type]
        new.go.set()
        await asyncio.sleep(0.05)
        assert not drained.done() and scheduler.busy_with(old)  # type: ignore[arg-type]
        old.go.set()
        results = await asyncio.gather(first, *rest)
        await asyncio.wait_for(drained, 10)
        assert not scheduler.busy_with(old)  # type: ignore[arg-type]
        # Old's jobs ran on old only, new's on new only, each in batches of its own.
        assert sum(old.batch_sizes) == 3 and sum(new.batch_sizes) == 3
        expected = old.inner.infer(np.stack(tensors))
        np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)
        await scheduler.stop()


def test_appliance_reload_refuses_a_pid_that_is_not_a_server(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        done = subprocess.run([sys.executable, "-m", "appliance", "reload", "--pid", str(other.pid)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
        assert (done.returncode, done.stderr) == (
            1, f"appliance: error: process {other.pid} (from --pid) is not an appliance server; is the server running?\n")
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()
