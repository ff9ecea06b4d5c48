"""Sync to a bucket: one contract over S3 (moto), GCS (gcp-storage-emulator) and Azure (azurite), plus faults.

Every server is real and on 127.0.0.1 (tests/buckets.py); what lands in a
bucket is read back with plain HTTP, not through the appliance's code.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest
from aiohttp.test_utils import TestClient
from PIL import ExifTags, Image

from appliance import buckets
from appliance.app import create_app
from appliance.cases import list_cases
from appliance.config import Config, parse_config
from appliance.keys import STORE, SYNC
from appliance.privacy import strip_metadata
from appliance.storage import BACKENDS, open_store, takes_images
from appliance.sync import keys
from appliance.sync.commands import sync_command
from appliance.sync.worker import backoff_delay

from .buckets import Bucket, Server
from .conftest import encode, photo
from .stores import requeue
from .test_api import upload
from .test_serve import post_image, running, wait_ready

# Every registered sync target and store: a new one gets these tests by its registry line.
PROVIDERS = tuple(buckets.PROVIDERS)
USER = {"X-User-Id": "user001", "X-User-Role": "gp"}
BOX = "box-1"
_names = itertools.count()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """One server per provider for the whole session."""
    started: dict[str, Server] = {}
    try:
        for provider in PROVIDERS:
            server = Server(provider, tmp_path_factory.mktemp(f"server-{provider}"))
            server.start()
            started[provider] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def make_bucket(tmp_path: Path) -> Callable[..., Bucket]:
    """A fresh, empty bucket on a server."""

    def make(server: Server, **options: Any) -> Bucket:
        # No hyphens: the GCS emulator cannot route a percent-encoded one in the bucket name.
        bucket = Bucket(server, f"bkt{os.getpid()}x{next(_names)}", tmp_path, **options)
        bucket.create()
        return bucket

    return make


def sync_overrides(bucket: Bucket, **overrides: Any) -> dict[str, Any]:
    """make_config overrides for sync to `bucket`, with fast polling and retries for tests."""
    return {"sync__enabled": True, "sync__url": bucket.url("clinic"), "sync__box_id": BOX,
            "sync__poll_interval_s": 0.05, "sync__retry_base_s": 0.05, "sync__retry_max_s": 0.5,
            **bucket.config(), **overrides}


def gps_jpeg(seed: int = 0) -> bytes:
    """A phone-like JPEG with GPS position and device EXIF."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif[ExifTags.Base.Model] = "Phone 12"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 30.5)
    return encode(photo(seed=seed), "JPEG", exif=exif)


def has_gps(data: bytes) -> bool:
    return bool(Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo))


async def check(client: TestClient, data: bytes, query: str = "") -> dict[str, Any]:
    response = await client.post(f"/check-image{query}", data=upload(data), headers=USER)
    assert response.status == 200, await response.text()
    return await response.json()


async def sync_status(client: TestClient) -> dict[str, Any]:
    assert (await client.get("/ready")).status == 200  # sync's state never decides readiness
    response = await client.get("/v1/info")  # /ready names its checks only (issue 13)
    assert response.status == 200
    return (await response.json())["sync"]


async def wait_status(client: TestClient, wanted: Callable[[dict[str, Any]], bool],
                      timeout_s: float = 60) -> dict[str, Any]:
    """Wait for a sync status that is `wanted`, its backlog counted after this call began.

    The worker re-reads its backlog between batches, so a status read at once may still
    count the outbox as it was before the caller's last request.
    """
    since = datetime.now(timezone.utc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await sync_status(client)
        if datetime.fromisoformat(status["checked_at"]) > since and wanted(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"sync status never became what was wanted: {status}")


async def wait_synced(client: TestClient, timeout_s: float = 60) -> dict[str, Any]:
    """Wait for an empty backlog, as counted after this call began."""
    return await wait_status(client, lambda status: status["backlog"] == 0, timeout_s)


def expected_objects(store: Any, user: str = "user001") -> dict[str, bytes]:
    """Every object the bucket must hold for the store's current contents, key -> bytes."""
    objects: dict[str, bytes] = {}
    for record in store.list_images(user):
        data = store.read_image(user, record["image_id"])
        fmt = {"jpeg": "jpeg", "png": "png", "webp": "webp"}[record["format"]]
        objects[f"clinic/{keys.image_key(BOX, user, record, fmt)}"] = strip_metadata(data, fmt)
        objects[f"clinic/{keys.image_record_key(BOX, user, record)}"] = json.dumps(record, sort_keys=True).encode()
    for case in list_cases(store, user, status=None, limit=1000, include_uncertain=True, include_rejected=True):
        objects[f"clinic/{keys.case_key(BOX, user, case['case_id'])}"] = json.dumps(case, sort_keys=True).encode()
    return objects


def assert_bucket_equals(bucket: Bucket, expected: dict[str, bytes]) -> None:
    """Exactly these keys, each with these bytes and its sha256 in the object's metadata."""
    assert bucket.keys() == sorted(expected)
    for key, data in expected.items():
        got, _ = bucket.read(key)
        assert got == data, key
        assert bucket.stored_sha256(key) == hashlib.sha256(data).hexdigest(), key


# -- the contract, over every provider ------------------------------------------


# gcp-storage-emulator answers a GET without Last-Modified, which obstore needs to read an object
# back, so images kept in a GCS bucket (the postgres back end's) cannot be read from the emulator;
# real GCS sends it. s3 and azure cover that back end here.
SYNC_CASES = [(provider, backend) for provider in PROVIDERS for backend in sorted(BACKENDS)
              if not (provider == "gcs" and takes_images(backend))]


@pytest.mark.parametrize(("provider", "backend"), SYNC_CASES)
async def test_images_records_and_cases_reach_the_bucket_once_and_intact(
        aiohttp_client: Any, make_config: Callable[..., Config], make_bucket: Callable[..., Bucket],
        servers: dict[str, Server], provider: str, backend: str) -> None:
    bucket = make_bucket(servers[provider])
    # A back end whose instances share the outbox (postgres) keeps its images in a bucket of their
    # own, which the worker reads them back from.
    images = {"storage__images": "bucket", "storage__images_url": make_bucket(servers[provider]).url("images")
              } if takes_images(backend) else {}
    # Stored with its GPS (the store-side strip is off), so what leaves the box is the sync's doing.
    config = make_config(storage__backend=backend, privacy__strip_metadata_on_store=False, **images,
                         **sync_overrides(bucket))
    client = await aiohttp_client(create_app(config))
    first = await check(client, gps_jpeg(1))
    case_id = first["case_id"]
    second = await check(client, encode(photo(seed=2, colour=(90, 60, 160)), "PNG"), f"?case_id={case_id}")
    response = await client.post("/cases", json={"case_id": case_id, "notes": "first look", "gender": "f"},
                                 headers=USER)
    assert response.status == 200
    response = await client.put(f"/cases/{case_id}", json={"notes": "second look", "status": "reviewed"},
                                headers=USER)
    assert response.status == 200
    status = await wait_synced(client)
    assert (status["enabled"], status["state"], status["box_id"]) == (True, "idle", BOX)
    assert status["bytes_pending"] == 0 and status["oldest_pending"] is None

    store = client.app[STORE]
    expected = expected_objects(store)

    def day(image_id: str) -> str:  # each image's own date: the two may straddle midnight UTC
        created = store.image_record("user001", image_id)["created_at"]
        return f"{created[:4]}/{created[5:7]}/{created[8:10]}"

    first_key = f"clinic/{BOX}/images/user001/{day(first['image_id'])}/{first['image_id']}"
    second_key = f"clinic/{BOX}/images/user001/{day(second['image_id'])}/{second['image_id']}"
    assert sorted(expected) == sorted([
        f"{first_key}.jpg", f"{first_key}.json", f"{second_key}.png", f"{second_key}.json",
        f"clinic/{BOX}/cases/user001/{case_id}.json",
    ])
    assert_bucket_equals(bucket, expected)
    local = store.read_image("user001", first["image_id"])
    uploaded, _ = bucket.read(f"{first_key}.jpg")
    assert has_gps(local) and not has_gps(uploaded)
    case = json.loads(bucket.read(f"clinic/{BOX}/cases/user001/{case_id}.json")[0])
    assert (case["notes"], case["status"], case["gender"]) == ("second look", "reviewed", "f")
    assert sorted(case["image_ids"]) == sorted([first["image_id"], second["image_id"]])
    image_record = json.loads(bucket.read(f"{second_key}.json")[0])
    assert image_record["gender"] == "f"  # the case's take-over, synced
    if provider == "s3":  # S3's own check: the ETag of a plain PUT is the MD5 of what it stored
        _, headers = bucket.read(f"{first_key}.jpg")
        assert headers["etag"].strip('"') == hashlib.md5(uploaded).hexdigest()
    await client.close()

    # Re-drain everything (as after a crash between upload and done): same objects, no duplicates.
    images = [first["image_id"], second["image_id"]]
    requeue(backend, Path(store.outbox_path),
            [("image", "user001", image_id, 1) for image_id in images] + [("case", "user001", case_id, 1)])
    assert await asyncio.to_thread(sync_command, config.storage, config.sync, config.bucket, status=False, once=True) == 0
    assert_bucket_equals(bucket, expected)


# -- faults -----------------------------------------------------------------------


async def test_a_stopped_bucket_server_loses_nothing_and_drains_when_back(
        aiohttp_client: Any, make_config: Callable[..., Config], tmp_path: Path) -> None:
    server = Server("azure", tmp_path / "azurite")  # azurite keeps its blobs on disk across a restart
    server.start()
    try:
        bucket = Bucket(server, "faults", tmp_path)
        bucket.create()
        client = await aiohttp_client(create_app(make_config(**sync_overrides(bucket))))
        for seed in range(3):
            await check(client, encode(photo(seed=seed)))
        server.stop()  # mid-drain: some of those may be in flight
        for seed in range(3, 6):
            await check(client, encode(photo(seed=seed)))  # still answered while the bucket is down
        status = await wait_status(client, lambda status: status["state"] == "failing")
        assert status["backlog"] >= 3 and status["last_error"]
        assert status["bytes_pending"] > 0 and status["oldest_pending"] is not None
        server.start()
        await wait_synced(client)
        assert_bucket_equals(bucket, expected_objects(client.app[STORE]))
        assert len(bucket.keys()) == 12
    finally:
        server.stop()


async def test_rejected_credentials_show_in_status_keep_retrying_and_lose_nothing(
        aiohttp_client: Any, make_config: Callable[..., Config], make_bucket: Callable[..., Bucket],
        servers: dict[str, Server], tmp_path: Path) -> None:
    good = make_bucket(servers["azure"])
    wrong_key = "d3Jvbmcga2V5IGZvciB0ZXN0aW5nIG9ubHkgLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLQ=="
    (tmp_path / "bad").mkdir()
    bad = Bucket(servers["azure"], good.name, tmp_path / "bad", key=wrong_key)
    config = make_config(**sync_overrides(bad))
    client = await aiohttp_client(create_app(config))
    await check(client, encode(photo(seed=7)))
    outbox_path = Path(client.app[STORE].outbox_path)
    deadline = time.monotonic() + 60
    attempts = 0
    while attempts < 3 and time.monotonic() < deadline:  # several retries, not one
        await asyncio.sleep(0.05)
        with sqlite3.connect(outbox_path) as conn:
            attempts = conn.execute("SELECT max(attempts) FROM outbox").fetchone()[0] or 0
        conn.close()
    assert attempts >= 3
    status = await sync_status(client)
    assert status["state"] == "failing" and status["backlog"] == 1  # the image's job, kept
    assert "403" in status["last_error"] or "auth" in status["last_error"].lower()
    info = await (await client.get("/v1/info")).json()
    assert info["sync"]["state"] == "failing"
    await client.close()
    assert good.keys() == []
    # With the right key the same outbox drains: nothing was dropped.
    fixed = parse_config({**_raw(config), "bucket": {**_raw(config)["bucket"],
                                                       "credentials_file": str(good.credentials_file)}})
    assert await asyncio.to_thread(sync_command, fixed.storage, fixed.sync, fixed.bucket, status=False, once=True) == 0
    store = open_store("sqlite", config.storage.root)
    try:
        assert_bucket_equals(good, expected_objects(store))
    finally:
        store.close()


def _raw(config: Config) -> dict[str, Any]:
    """A config back as TOML-shaped tables (enough for parse_config)."""
    import dataclasses

    raw = {}
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if f.name == "runtime":
            continue
        raw[f.name] = {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
                       for k, v in vars(section).items() if v is not None}
    return raw


class HoldingProxy:
    """A TCP proxy on 127.0.0.1 that accepts uploads and forwards nothing while `holding`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            conn.settimeout(30)
            try:
                if conn.recv(65536):
                    self.held += 1  # a request arrived and will never be answered
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


def test_sigkill_mid_upload_then_restart_uploads_everything_once(
        make_bucket: Callable[..., Bucket], servers: dict[str, Server], tmp_path: Path, tiny_model_dir: Path) -> None:
    bucket = make_bucket(servers["s3"])
    proxy = HoldingProxy(servers["s3"].port)

    def write_config(endpoint: str) -> Path:
        from .buckets import free_port

        path = tmp_path / "config.toml"
        settings = {**bucket.config(), "bucket__endpoint": endpoint}
        path.write_text(
            f'[server]\nport = {free_port()}\n[model]\npath = "{tiny_model_dir}"\n'
            f'[storage]\nroot = "{tmp_path / "data"}"\n'
            f'[sync]\nenabled = true\nurl = "{bucket.url("clinic")}"\nbox_id = "{BOX}"\npoll_interval_s = 0.05\n'
            f'retry_base_s = 0.05\nretry_max_s = 0.5\n'
            "[bucket]\n" + "".join(f"{k.split('__')[1]} = {json.dumps(v)}\n" for k, v in settings.items())
        )
        return path

    config_path = write_config(f"http://127.0.0.1:{proxy.port}")
    port = int(config_path.read_text().split("port = ")[1].split("\n")[0])
    try:
        with running(config_path) as proc:
            wait_ready(proc, port)
            for seed in range(3):
                post_image(port, encode(photo(seed=seed)))
            deadline = time.monotonic() + 60
            while proxy.held == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proxy.held > 0  # an upload is on the wire
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
    finally:
        proxy.close()
    assert bucket.keys() == []
    config_path = write_config(servers["s3"].endpoint)
    port = int(config_path.read_text().split("port = ")[1].split("\n")[0])
    with running(config_path) as proc:
        wait_ready(proc, port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=5) as response:
                if json.loads(response.read())["sync"]["backlog"] == 0:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    store = open_store("sqlite", tmp_path / "data")
    try:
        assert len(store.list_images("user001")) == 3
        assert_bucket_equals(bucket, expected_objects(store))
    finally:
        store.close()


# -- the disk budget ---------------------------------------------------------------


async def test_over_the_disk_budget_new_images_get_507_and_nothing_is_dropped(
        aiohttp_client: Any, make_config: Callable[..., Config], tmp_path: Path) -> None:
    server = Server("s3", tmp_path / "moto")  # never started: every upload fails
    bucket = Bucket(server, "nowhere", tmp_path)
    client = await aiohttp_client(create_app(make_config(**sync_overrides(bucket, sync__disk_budget_bytes=1000))))
    await check(client, encode(photo(seed=1)))  # under budget when it arrived
    worker = client.app[SYNC]
    deadline = time.monotonic() + 30
    while not worker.over_budget and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    response = await client.post("/check-image", data=upload(encode(photo(seed=2))), headers=USER)
    assert response.status == 507
    detail = (await response.json())["detail"]
    assert detail.startswith("Sync backlog over its disk budget (") and "of 1000 bytes unsynced)" in detail
    status = await sync_status(client)
    assert status["over_budget"] is True and status["backlog"] == 1 and status["when_over_budget"] == "refuse"
    assert len(client.app[STORE].list_images("user001")) == 1


async def test_accept_policy_keeps_storing_over_budget_and_says_so(
        aiohttp_client: Any, make_config: Callable[..., Config], tmp_path: Path) -> None:
    bucket = Bucket(Server("s3", tmp_path / "moto"), "nowhere", tmp_path)
    overrides = sync_overrides(bucket, sync__disk_budget_bytes=1000, sync__when_over_budget="accept")
    client = await aiohttp_client(create_app(make_config(**overrides)))
    for seed in range(3):
        await check(client, encode(photo(seed=seed)))
    deadline = time.monotonic() + 30
    status = await sync_status(client)
    while status["backlog"] < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = await sync_status(client)
    assert status["over_budget"] is True and status["backlog"] == 3
    assert len(client.app[STORE].list_images("user001")) == 3


async def test_sync_off_reports_disabled_and_writes_no_outbox(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    config = make_config(storage__backend="disk")
    client = await aiohttp_client(create_app(config))
    await check(client, encode(photo()))
    assert await sync_status(client) == {"enabled": False}
    assert not (config.storage.root / "outbox.db").exists()


# -- units: backoff, config, the CLI ------------------------------------------------


def test_backoff_doubles_with_jitter_and_never_exceeds_five_minutes() -> None:
    low = [backoff_delay(n, 1.0, 300.0, rand=lambda: 0.0) for n in range(1, 12)]
    high = [backoff_delay(n, 1.0, 300.0, rand=lambda: 1.0) for n in range(1, 12)]
    assert high[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert low[:9] == [0.5, 1, 2, 4, 8, 16, 32, 64, 128]
    assert high[9:] == [300.0, 300.0] and low[9:] == [150.0, 150.0]
    import random

    rng = random.Random(4)
    assert max(backoff_delay(n, 1.0, 300.0, rand=rng.random) for n in range(1, 10_000)) <= 300.0
    assert backoff_delay(10_000, 1.0) <= 300.0


def test_a_record_with_a_lone_surrogate_still_makes_an_object_body() -> None:
    from appliance.sync.worker import _json

    body = _json({"notes": "\ud800", "case_id": "10000"})
    assert json.loads(body) == {"notes": "\ud800", "case_id": "10000"}
