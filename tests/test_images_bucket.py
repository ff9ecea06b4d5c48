"""Images in a bucket (storage/images.py): BucketImages against real moto (S3) and azurite (Azure) servers.

The servers run on 127.0.0.1 (tests/buckets.py); what lands in a bucket is read
back with plain HTTP, not through the appliance's code. The config rules of
`storage.images` and the wiring of `open_configured_store` are tested here too.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import obstore
import pytest

from appliance.buckets import open_target
from appliance.buckets.config import BucketConfig
from appliance.config import Config, parse_config
from appliance.errors import ConfigError, StoreError, StoreUnavailable
from appliance.storage import StoredImage, open_configured_store
from appliance.storage.images import BucketImages, LocalImages, image_key, open_images
from appliance.storage.postgres import PostgresStore

from .buckets import Bucket, Server
from .stores import image_bytes

PROVIDERS = ("s3", "azure")  # S3 checks the upload's sha256 itself; Azure's ETag is opaque, so it is read back
_names = itertools.count()
JPEG = image_bytes("JPEG", seed=1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for provider in PROVIDERS:
            server = Server(provider, tmp_path_factory.mktemp(f"images-{provider}"))
            server.start()
            started[provider] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def make_bucket(tmp_path: Path) -> Callable[[Server], Bucket]:
    def make(server: Server) -> Bucket:
        bucket = Bucket(server, f"img{os.getpid()}x{next(_names)}", tmp_path)
        bucket.create()
        return bucket

    return make


def bucket_config(bucket: Bucket) -> BucketConfig:
    return parse_config({"bucket": {k.split("__")[1]: v for k, v in bucket.config().items()}}).bucket


def place_on(bucket: Bucket, prefix: str = "clinic/images") -> BucketImages:
    return BucketImages(open_target(bucket.url(prefix), bucket_config(bucket)))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_put_get_delete_round_trip(servers: dict[str, Server], make_bucket: Callable[[Server], Bucket],
                                   provider: str) -> None:
    bucket = make_bucket(servers[provider])
    place = place_on(bucket)
    key = image_key("user001", "img1", ".jpg", sealed=False)
    place.put(key, JPEG)
    assert place.get(key) == JPEG
    place.put(key, JPEG + b"x")  # overwriting is allowed
    assert place.get(key) == JPEG + b"x"
    place.delete(key)
    assert place.get(key) is None
    assert bucket.keys() == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_object_is_none_and_deleting_it_is_fine(servers: dict[str, Server],
                                                         make_bucket: Callable[[Server], Bucket],
                                                         provider: str) -> None:
    place = place_on(make_bucket(servers[provider]))
    assert place.get("user001/never.jpg") is None
    place.delete("user001/never.jpg")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_keys_go_under_the_url_prefix_with_their_sha256(servers: dict[str, Server],
                                                         make_bucket: Callable[[Server], Bucket],
                                                         provider: str) -> None:
    bucket = make_bucket(servers[provider])
    place = place_on(bucket, "clinic/images")
    sealed = b"\x01sealed bytes"
    place.put(image_key("user001", "img1", ".jpg", sealed=False), JPEG)
    place.put(image_key("user002", "img2", ".png", sealed=True), sealed)
    assert bucket.keys() == ["clinic/images/user001/img1.jpg", "clinic/images/user002/img2.bin"]
    data, headers = bucket.read("clinic/images/user001/img1.jpg")
    assert data == JPEG and headers["content-type"] == "image/jpeg"
    assert bucket.stored_sha256("clinic/images/user001/img1.jpg") == hashlib.sha256(JPEG).hexdigest()
    data, headers = bucket.read("clinic/images/user002/img2.bin")
    assert data == sealed and headers["content-type"] == "application/octet-stream"
    # Without a prefix, keys start at the bucket's root.
    bare = place_on(bucket, "")
    bare.put("user003/img3.webp", JPEG)
    assert "user003/img3.webp" in bucket.keys()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bytes_changed_in_the_bucket_are_refused(servers: dict[str, Server], make_bucket: Callable[[Server], Bucket],
                                                 provider: str) -> None:
    bucket = make_bucket(servers[provider])
    place = place_on(bucket)
    place.put("user001/img1.jpg", JPEG)
    digest = hashlib.sha256(JPEG).hexdigest()
    # Someone rewrites the object behind the appliance's back, keeping the old sha256 metadata.
    obstore.put(place.target.store, "user001/img1.jpg", b"tampered", attributes={"sha256": digest})
    with pytest.raises(StoreError) as caught:
        place.get("user001/img1.jpg")
    assert caught.value.status == 500
    assert caught.value.detail == (
        f"image user001/img1.jpg in {bucket.url('clinic/images')}: its bytes' sha256 "
        f"{hashlib.sha256(b'tampered').hexdigest()} differs from the {digest} stored with it"
    )


def test_a_bucket_that_does_not_answer_is_503_and_logged_once_per_outage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = Server("s3", tmp_path / "moto")  # this test's own server, stopped and started again
    server.start()
    try:
        bucket = Bucket(server, "outage", tmp_path)
        bucket.create()
        place = place_on(bucket, "images")
        place.put("user001/img1.jpg", JPEG)
        server.stop()
        expected = "the image bucket does not answer; try again later"
        with caplog.at_level(logging.WARNING, logger="appliance.storage"):
            for call in (lambda: place.put("user001/img2.jpg", JPEG), lambda: place.get("user001/img1.jpg"),
                         lambda: place.delete("user001/img1.jpg")):
                with pytest.raises(StoreUnavailable) as caught:
                    call()
                assert (caught.value.status, caught.value.detail) == (503, expected)
                assert caught.value.headers == {"Retry-After": "5"}
            server.start()
            bucket.create()  # moto keeps buckets in memory: the restarted server starts empty
            place.put("user001/img2.jpg", JPEG)
            assert place.get("user001/img2.jpg") == JPEG
        messages = [r.getMessage() for r in caplog.records if r.name == "appliance.storage"]
        assert len(messages) == 2
        assert messages[0].startswith("image bucket s3://outage/images does not answer (storing image user001/img2.jpg): ")
        assert messages[1] == "image bucket s3://outage/images answers again"
    finally:
        server.stop()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_missing_bucket_is_a_500_naming_the_url_key(servers: dict[str, Server], tmp_path: Path,
                                                       provider: str) -> None:
    bucket = Bucket(servers[provider], "nosuchbucket", tmp_path)  # never created
    place = place_on(bucket)
    with pytest.raises(StoreError) as caught:
        place.put("user001/img1.jpg", JPEG)
    assert (caught.value.status, caught.value.detail) == (
        500, f"storing image user001/img1.jpg in {bucket.url('clinic/images')}: no such bucket or container "
             "(storage.images_url)")


def test_wrong_credentials_are_a_500_naming_the_credentials_file(
        servers: dict[str, Server], make_bucket: Callable[[Server], Bucket], tmp_path: Path) -> None:
    good = make_bucket(servers["azure"])
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    (tmp_path / "bad").mkdir()
    bad = Bucket(servers["azure"], good.name, tmp_path / "bad", key=wrong_key)
    place = place_on(bad)
    with pytest.raises(StoreError) as caught:
        place.put("user001/img1.jpg", JPEG)
    assert caught.value.status == 500
    assert caught.value.detail.startswith(
        f"storing image user001/img1.jpg in {bad.url('clinic/images')}: the bucket refuses the appliance's "
        "credentials (bucket.credentials_file): ")


# -- config and wiring ------------------------------------------------------------------


def configured(tmp_path: Path, **storage: Any) -> Config:
    return parse_config({"storage": {"root": str(tmp_path / "data"), **storage}})


@pytest.mark.parametrize("backend", ["sqlite", "disk"])
def test_bucket_images_need_a_back_end_that_takes_them(tmp_path: Path, backend: str) -> None:
    with pytest.raises(ConfigError) as caught:
        configured(tmp_path, backend=backend, images="bucket", images_url="s3://b/images")
    assert caught.value.detail == (
        f'storage.images: "bucket" needs a back end that keeps its records apart from its images, '
        f'storage.backend = "postgres"; got storage.backend = {backend!r}, which keeps its images on its disk '
        f"(sync forwards them to a bucket)"
    )


def test_bucket_images_need_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        configured(tmp_path, backend="postgres", images="bucket")
    assert caught.value.detail == ('storage.images_url: expected a bucket URL (s3://, gs://, az:// or https://) '
                                   'when storage.images = "bucket"')


def test_bucket_images_url_is_checked_like_sync_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        configured(tmp_path, backend="postgres", images="bucket", images_url="ftp://b/images")
    assert caught.value.detail == ("storage.images_url: expected s3://, gs://, az:// or an https URL of S3, "
                                   "Google Cloud Storage or Azure Blob; got 'ftp://b/images'")


def test_images_is_local_or_bucket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        configured(tmp_path, images="s3")
    assert caught.value.detail == "storage.images: expected one of local, bucket; got 's3'"


def test_configured_store_gets_the_bucket(servers: dict[str, Server], make_bucket: Callable[[Server], Bucket],
                                          tmp_path: Path, database_url: str) -> None:
    bucket = make_bucket(servers["s3"])
    raw = {"storage": {"root": str(tmp_path / "data"), "backend": "postgres", "images": "bucket",
                       "images_url": bucket.url("clinic/images")},
           "bucket": {k.split("__")[1]: v for k, v in bucket.config().items()}}
    config = parse_config(raw)
    store = open_configured_store(config.storage, outbox=False, bucket=config.bucket)
    try:
        assert isinstance(store, PostgresStore) and isinstance(store.images, BucketImages)
        store.save_image("user001", StoredImage("img1", JPEG, ".jpg"), {"case_id": "10000", "status": "success"})
        assert bucket.keys() == ["clinic/images/user001/img1.jpg"]
        assert store.read_image("user001", "img1") == JPEG
    finally:
        store.close()
    # "local" leaves the back end its own files under the root.
    local = open_configured_store(configured(tmp_path / "l", backend="postgres").storage, outbox=False)
    try:
        assert isinstance(local, PostgresStore) and isinstance(local.images, LocalImages)
    finally:
        local.close()


def test_open_images_local_is_files_under_the_root(tmp_path: Path) -> None:
    place = open_images(configured(tmp_path).storage, BucketConfig(), tmp_path / "data")
    assert isinstance(place, LocalImages) and place.directory == tmp_path / "data" / "images"
    place.directory.mkdir(parents=True)  # a store makes it when it opens
    place.put("user001/img1.jpg", JPEG)
    assert (tmp_path / "data" / "images" / "user001" / "img1.jpg").read_bytes() == JPEG
    assert place.get("user001/img1.jpg") == JPEG
    place.delete("user001/img1.jpg")
    assert place.get("user001/img1.jpg") is None


async def test_ready_and_writes_answer_503_while_the_image_bucket_is_down_then_recover(
        aiohttp_client: Any, make_config: Any, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The appliance on postgres with images in a bucket, the bucket's server stopped and started again."""
    from appliance.app import create_app

    from .conftest import encode, photo

    monkeypatch.setattr(BucketImages, "PROBE_INTERVAL_S", 0.0)  # probe at every /ready: no waiting in the test
    server = Server("s3", tmp_path / "moto")
    server.start()
    try:
        bucket = Bucket(server, "clinic", tmp_path)
        bucket.create()
        overrides = {f"bucket__{k.split('__')[1]}": v for k, v in bucket.config().items()}
        app = create_app(make_config(storage__backend="postgres", storage__images="bucket",
                                     storage__images_url=bucket.url("images"), **overrides))
        client = await aiohttp_client(app)
        headers = {"X-User-Id": "user001"}

        async def upload() -> tuple[int, dict[str, Any], str | None]:
            form = aiohttp.FormData()
            form.add_field("file", encode(photo(seed=3)), filename="a.jpg", content_type="image/jpeg")
            response = await client.post("/check-image", data=form, headers=headers)
            return response.status, await response.json(), response.headers.get("Retry-After")

        assert (await client.get("/ready")).status == 200
        assert (await upload())[0] == 200
        server.stop()
        ready = await client.get("/ready")
        assert (ready.status, (await ready.json())["checks"]) == (503, {"model": True, "store": False})
        assert await upload() == (503, {"detail": "the image bucket does not answer; try again later"}, "5")
        server.start()
        bucket.create()  # moto keeps buckets in memory
        assert (await client.get("/ready")).status == 200
        status, answer, _ = await upload()
        assert status == 200
        assert f"images/user001/{answer['image_id']}.jpg" in bucket.keys("images")
    finally:
        server.stop()


def test_postgres_with_sync_needs_its_images_in_the_bucket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"storage": {"root": str(tmp_path / "data"), "backend": "postgres"},
                      "sync": {"enabled": True, "url": "s3://b/sync"}})
    assert caught.value.detail == (
        'storage.images: with storage.backend = "postgres" and sync on, every instance drains one shared outbox '
        'and may upload any image, so the images must be where all of them read them: set storage.images = '
        '"bucket" (and storage.images_url)')
