"""Observability: /metrics (own registry), request ids, one JSON log line per request, /v1/status, the page's files."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from appliance.app import create_app
from appliance.ops.logs import JsonFormatter, TextFormatter
from appliance.ops.metrics import RecentRequests
from appliance.security.auth import ApiKeys

from .conftest import encode, photo
from .test_api import upload

USER = {"X-User-Id": "user001"}


@pytest.fixture
async def client(aiohttp_client: Any, make_config: Any) -> TestClient:
    return await aiohttp_client(create_app(make_config(), api_keys=ApiKeys()))


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_requests_stages_batches_and_store(client: TestClient) -> None:
    for seed in range(3):
        response = await client.post("/check-image", data=upload(encode(photo(seed=seed))), headers=USER)
        assert response.status == 200
    await client.post("/cases", json={"case_id": "10000"}, headers=USER)
    await client.post("/cases/next-id", headers={})  # a 400
    m = await scrape(client)
    assert m[("appliance_requests_total", (("method", "POST"), ("route", "/check-image"), ("status", "200")))] == 3
    assert m[("appliance_requests_total", (("method", "POST"), ("route", "/cases/next-id"), ("status", "400")))] == 1
    assert m[("appliance_request_duration_seconds_count", (("route", "/check-image"),))] == 3
    for stage in ("decode", "inference", "storage"):
        assert m[("appliance_stage_duration_seconds_count", (("stage", stage),))] == 3
    assert m[("appliance_inference_batch_size_sum", ())] == 3
    assert m[("appliance_inference_images_total", ())] == 3
    assert m[("appliance_inference_queue_depth", ())] == 0
    assert m[("appliance_store_images", ())] == 3
    assert m[("appliance_store_cases", ())] == 1
    assert m[("appliance_ready", ())] == 1
    assert m[("appliance_requests_in_progress", ())] == 1  # the scrape itself
    assert m[("appliance_model_info", (("artifact", "openvino-fp32"), ("demo", "true"), ("device", "CPU"), ("name", "tiny"),
                                       ("runtime", "openvino"), ("version", "1")))] == 1
    assert not any(name.startswith("appliance_sync") for name, _ in m)  # no sync worker in this app
    assert not any(name.startswith("appliance_") for name in REGISTRY._names_to_collectors)  # own registry only


async def test_unmatched_paths_share_one_label(client: TestClient) -> None:
    for path in ("/nope/1", "/nope/2", "/etc/passwd"):
        assert (await client.get(path)).status == 404
    m = await scrape(client)
    assert m[("appliance_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 3


async def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    response = await client.get("/health", headers={"X-Request-Id": "phone-abc.123"})
    assert response.headers["X-Request-Id"] == "phone-abc.123"
    made = (await client.get("/health")).headers["X-Request-Id"]
    assert len(made) == 32 and int(made, 16) >= 0
    hostile = (await client.get("/health", headers={"X-Request-Id": "a\"b<script>" + "x" * 300})).headers["X-Request-Id"]
    assert len(hostile) == 32  # not echoed: replaced
    response = await client.post("/cases/next-id", headers={"X-Request-Id": "err-1"})
    assert response.status == 400 and response.headers["X-Request-Id"] == "err-1"  # errors carry it too


async def test_one_log_line_per_request_without_patient_data(client: TestClient,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.access")
    case = {"case_id": "10000", "gender": "female", "age": "54", "notes": "lesion on the back, patient anxious"}
    response = await client.post("/cases", json=case, headers={**USER, "X-Request-Id": "log-1"})
    assert response.status == 200
    data = encode(photo(seed=1))
    await client.post("/check-image", data=upload(data), headers={**USER, "X-Request-Id": "log-2"})
    await client.get("/health")  # probes log at DEBUG only
    records = [r for r in caplog.records if r.name == "appliance.access"]
    assert [r.fields["request_id"] for r in records] == ["log-1", "log-2"]  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(records[0]))
    assert {k: line[k] for k in ("level", "logger", "method", "route", "status", "user", "key")} == {
        "level": "INFO", "logger": "appliance.access", "method": "POST", "route": "/cases", "status": 200,
        "user": "user001", "key": None}
    assert line["msg"].startswith("POST /cases 200 ")
    # Every line of every logger, without the fields that carry clock readings (a time or a
    # duration can contain "54" by chance): what is left must hold none of the patient's data.
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    for logged in lines:
        del logged["ts"]
        logged.pop("duration_ms", None)
        logged["msg"] = re.sub(r" [0-9.]+ms$", "", logged["msg"])
    everything = json.dumps(lines)
    for secret in ("female", "anxious", "lesion", "54"):
        assert secret not in everything
    assert TextFormatter().format(records[0]).split(" appliance.access: ")[1].startswith("POST /cases 200 ")


async def test_status_json(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys.of({"it": "it-key-000"})))
    key = {"X-API-Key": "it-key-000"}
    for seed in range(2):
        await client.post("/check-image", data=upload(encode(photo(seed=seed))), headers={**USER, **key})
    await client.get("/ready")  # probes are not "recent requests"
    response = await client.get("/v1/status", headers=key)
    status = await response.json()
    assert status["appliance"]["ready"] is True and status["appliance"]["uptime_s"] >= 0
    assert status["model"]["name"] == "tiny" and status["model"]["demo"] is True
    assert status["runtime"]["runtime"] == "openvino" and status["runtime"]["device"] == "CPU"
    recent = status["recent"]
    assert (recent["requests"], recent["client_errors"], recent["server_errors"]) == (2, 0, 0)
    assert 0 < recent["p50_ms"] <= recent["p95_ms"]
    assert status["storage"]["backend"] == "sqlite" and status["storage"]["images"] == 2
    assert status["storage"]["disk_total_bytes"] > status["storage"]["disk_free_bytes"] > 0
    assert status["sync"] is None
    assert status["security"] == {"api_keys": 1, "tls": False, "tls_fingerprint_sha256": None}
    text = json.dumps(status)
    assert "user001" not in text  # no user ids, records or images: counts only


def test_recent_window_and_percentiles() -> None:
    recent = RecentRequests(window_s=60)
    recent.add(5.0, 200, now=900.0)  # older than the window by the time of the summary
    for i in range(1, 101):
        recent.add(i / 1000.0, 200 if i <= 90 else 503 if i <= 95 else 404, now=1000.0)
    summary = recent.summary(now=1001.0)
    assert summary == {"window_s": 60, "requests": 100, "client_errors": 5, "server_errors": 5,
                       "p50_ms": 50.0, "p95_ms": 95.0}
    assert RecentRequests().summary()["p50_ms"] is None


async def test_status_page_files_are_served_strictly(client: TestClient) -> None:
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/static/status.js" defer></script>' in html and "http" not in html.split("<body>")[0]
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for path, kind in (("/static/status.js", "application/javascript"), ("/static/status.css", "text/css")):
        response = await client.get(path)
        assert (response.status, response.content_type) == (200, kind)
        assert "http://" not in await response.text() and "https://" not in await response.text()  # no CDN
