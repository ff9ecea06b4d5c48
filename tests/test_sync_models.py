"""Models from a bucket (model.url / MODEL_URL) against a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest

from appliance.app import create_app
from appliance.config import Config
from appliance.errors import ModelError
from appliance.modelfetch import model_source

from .buckets import Bucket, Server
from .test_serve import running

MODEL_KEY = "models/tiny"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("s3", tmp_path_factory.mktemp("moto-models"))
    server.start()
    yield server
    server.stop()


def publish(bucket: Bucket, version_dir: Path, prefix: str = MODEL_KEY) -> None:
    """Upload a model version directory as `<prefix>/<version>/...`."""
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        bucket.put(f"{prefix}/{version_dir.name}/{path.relative_to(version_dir).as_posix()}", path.read_bytes())


def model_config(make_config: Callable[..., Config], bucket: Bucket, tmp_path: Path, **overrides: Any) -> Config:
    return make_config(model__url=bucket.url(MODEL_KEY), model__cache_dir=str(tmp_path / "cache"),
                       model__path=str(tmp_path / "no-such-model"), **{**bucket.config(), **overrides})


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


async def test_a_model_in_a_bucket_is_fetched_verified_and_served(
        aiohttp_client: Any, make_config: Callable[..., Config], s3: Server, tmp_path: Path,
        tiny_model_dir: Path) -> None:
    bucket = Bucket(s3, "models-served", tmp_path)
    bucket.create()
    publish(bucket, tiny_model_dir)
    config = model_config(make_config, bucket, tmp_path)
    client = await aiohttp_client(create_app(config))
    info = await (await client.get("/v1/info")).json()
    assert (info["model"]["name"], info["model"]["version"]) == ("tiny", "1")
    (copy,) = [p for p in (tmp_path / "cache").glob("*/1-*")]
    assert tree_hashes(copy) == tree_hashes(tiny_model_dir)
    verified = json.loads((copy.parent / "verified.json").read_text())
    assert (verified["version"], verified["url"]) == (1, bucket.url(MODEL_KEY))


async def test_a_version_from_a_bucket_arrives_with_its_verification_set_and_is_proven_here(
        aiohttp_client: Any, make_config: Callable[..., Config], s3: Server, tmp_path: Path,
        model_copy: Path) -> None:
    from .test_proof import wait_for, with_verification_set

    with_verification_set(model_copy, {"top1_agreement": 0.99, "max_abs_dp": 0.05})
    bucket = Bucket(s3, "models-proven", tmp_path)
    bucket.create()
    publish(bucket, model_copy)
    bucket.put(f"{MODEL_KEY}/1/verification/0003.jpeg.unlisted", b"not in the manifest: not fetched")
    client = await aiohttp_client(create_app(model_config(make_config, bucket, tmp_path)))
    (copy,) = [p for p in (tmp_path / "cache").glob("*/1-*")]
    assert tree_hashes(copy) == tree_hashes(model_copy)
    info = await wait_for(client, "proven")
    assert all(p["passed_here"] for p in info["served_path"]["proof"]["paths"].values())
    assert Path(info["served_path"]["proof"]["file"]).parent == tmp_path / "cache"


def test_a_format_2_model_arrives_with_its_manifest_digest(make_config: Callable[..., Config], s3: Server,
                                                          tmp_path: Path, model_copy: Path) -> None:
    from .test_model import TIMES, to_format_2

    to_format_2(model_copy, TIMES)
    bucket = Bucket(s3, "models-format2", tmp_path)
    bucket.create()
    publish(bucket, model_copy)
    config = model_config(make_config, bucket, tmp_path)
    path = model_source(config.model, config.bucket)
    assert tree_hashes(path) == tree_hashes(model_copy)
    assert (path / "model.json.sha256").is_file()
    bucket.put(f"{MODEL_KEY}/1/model.json.sha256", b"0" * 64 + b"  model.json\n")
    config = model_config(make_config, bucket, tmp_path / "fresh")
    with pytest.raises(ModelError, match=r"model.json does not match model.json.sha256 beside it; refusing this model"):
        model_source(config.model, config.bucket)


def test_a_version_directory_url_works_too(make_config: Callable[..., Config], s3: Server, tmp_path: Path,
                                           tiny_model_dir: Path) -> None:
    bucket = Bucket(s3, "models-version", tmp_path)
    bucket.create()
    publish(bucket, tiny_model_dir)
    config = make_config(model__url=bucket.url(f"{MODEL_KEY}/1"), model__cache_dir=str(tmp_path / "cache"),
                         **bucket.config())
    path = model_source(config.model, config.bucket)
    assert path.name == "1-1" and tree_hashes(path) == tree_hashes(tiny_model_dir)


def test_a_tampered_artifact_is_refused_with_one_line(
        s3: Server, tmp_path: Path, model_copy: Path, tiny_model_dir: Path) -> None:
    bucket = Bucket(s3, "models-tampered", tmp_path)
    bucket.create()
    onnx = model_copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-4] + b"\x00\x00\x00\x01")  # the manifest still names the old sha256
    publish(bucket, model_copy)
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        f'[server]\nport = 1\n[model]\nurl = "{bucket.url(MODEL_KEY)}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[storage]\nroot = "{tmp_path / "data"}"\n[bucket]\n'
        + "".join(f"{k.split('__')[1]} = {json.dumps(v)}\n" for k, v in bucket.config().items())
    )
    with running(config_path) as proc:
        assert proc.wait(60) == 1
    lines = [line for line in (tmp_path / "server.log").read_text().splitlines() if "appliance: error" in line]
    good = hashlib.sha256((tiny_model_dir / "model.onnx").read_bytes()).hexdigest()
    bad = hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert lines == [
        f"appliance: error: model.url: {bucket.url(MODEL_KEY)}/1/model.onnx does not match its manifest sha256 "
        f"(expected {good}, got {bad}); refusing this model"
    ]
    assert not any((tmp_path / "cache").glob("*/1-*"))  # nothing unverified was kept


async def test_offline_start_uses_the_last_verified_copy(
        aiohttp_client: Any, make_config: Callable[..., Config], tmp_path: Path, tiny_model_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    server = Server("s3", tmp_path / "moto")  # stopped below: this test's own server
    server.start()
    try:
        bucket = Bucket(server, "models-offline", tmp_path)
        bucket.create()
        publish(bucket, tiny_model_dir)
        config = model_config(make_config, bucket, tmp_path, bucket__timeout_s=2.0)
        fetched = model_source(config.model, config.bucket)
    finally:
        server.stop()
    with caplog.at_level(logging.WARNING, logger="appliance.modelfetch"):
        client = await aiohttp_client(create_app(config))
    assert (await client.get("/ready")).status == 200
    assert any(r.getMessage().startswith(f"model.url: cannot fetch {bucket.url(MODEL_KEY)} (")
               and r.getMessage().endswith(f"using the last verified copy {fetched}") for r in caplog.records)


def test_offline_without_a_verified_copy_is_a_clear_error(
        make_config: Callable[..., Config], tmp_path: Path) -> None:
    bucket = Bucket(Server("s3", tmp_path / "moto"), "never-started", tmp_path)
    config = model_config(make_config, bucket, tmp_path, bucket__timeout_s=2.0)
    with pytest.raises(ModelError) as caught:
        model_source(config.model, config.bucket)
    detail = caught.value.detail
    assert detail.startswith(f"model.url: cannot fetch {bucket.url(MODEL_KEY)} (")
    cache = tmp_path / "cache" / hashlib.sha256(bucket.url(MODEL_KEY).encode()).hexdigest()[:16]
    assert detail.endswith(f") and there is no verified copy in {cache}") and "\n" not in detail
