"""Issue 13, item 5: every file read from a model directory is hashed; Ed25519 signatures; atomic model fetching."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from appliance.config import Config, load_config
from appliance.errors import ModelError
from appliance.inference.model import load_model
from appliance.inference.paths import Wanted
from appliance.modeldir import read_signing_key, sign_manifest
from appliance.modelfetch import ModelFetchRefused, model_source

from .buckets import Bucket, Server
from .conftest import rewrite_manifest
from .test_model import TIMES, to_format_2
from .test_sync_models import MODEL_KEY, model_config, publish, s3  # noqa: F401  (s3: the module's server fixture)


def make_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 private key and its public key, as PEM files (what openssl genpkey / pkey -pubout write)."""
    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load(version: Path, trusted: tuple[Path, ...] = ()) -> Any:
    from appliance.config import parse_config

    config = parse_config({"runtime": {"backend": "onnxruntime"}})
    return load_model(version, Wanted("onnxruntime", "f32", "auto"), config.runtime.selected, max_batch=4,
                      trusted_keys=trusted)


@pytest.fixture
def signed(model_copy: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A format 2 model copy signed by a fresh key; (version dir, public key)."""
    to_format_2(model_copy, TIMES)
    private, public = make_key_pair(tmp_path, "release")
    sign_manifest(model_copy, read_signing_key(private))
    return model_copy, public


def test_a_signed_model_loads_with_its_key_trusted(signed: tuple[Path, Path]) -> None:
    version, public = signed
    model = load(version, (public,))
    assert model.manifest.name == "tiny"
    model.runtime.close()


def test_an_unsigned_model_is_refused_when_keys_are_trusted(signed: tuple[Path, Path]) -> None:
    version, public = signed
    (version / "model.json.sig").unlink()
    with pytest.raises(ModelError, match=f"^{version / 'model.json.sig'}: missing; model.trusted_keys is set, so only "
                                         "a model signed by one of them \\(convert --sign-key\\) loads$"):
        load(version, (public,))
    model = load(version)  # without trusted keys, signatures are optional
    model.runtime.close()


def test_a_model_signed_by_another_key_is_refused_naming_key_and_file(signed: tuple[Path, Path], tmp_path: Path) -> None:
    version, _ = signed
    _, other = make_key_pair(tmp_path, "other")
    with pytest.raises(ModelError, match=f"^{version / 'model.json.sig'}: not a valid signature of model.json by any "
                                         f"of model.trusted_keys \\({other}\\)$"):
        load(version, (other,))


def test_an_edited_manifest_with_a_fresh_digest_fails_the_signature(signed: tuple[Path, Path]) -> None:
    # Whoever can write the directory can recompute model.json.sha256, but cannot sign.
    version, public = signed
    rewrite_manifest(version, lambda m: m["served_paths"]["onnx-fp32/exact"].update(selfcheck_max_abs_dp=1.0))
    _refresh_digest(version)
    with pytest.raises(ModelError, match="model.json.sig: not a valid signature of model.json by any of"):
        load(version, (public,))


def test_format_1_cannot_satisfy_trusted_keys(model_copy: Path, tmp_path: Path) -> None:
    _, public = make_key_pair(tmp_path, "release")
    with pytest.raises(ModelError, match=f"^{model_copy / 'model.json'}: format 1 cannot be signed and "
                                         "model.trusted_keys is set; reconvert with convert --sign-key$"):
        load(model_copy, (public,))


def test_a_format_2_golden_image_without_a_hash_is_refused(model_copy: Path) -> None:
    to_format_2(model_copy, TIMES)
    rewrite_manifest(model_copy, lambda m: m["golden"][0].pop("sha256"))
    _refresh_digest(model_copy)
    with pytest.raises(ModelError, match=f"^{model_copy / 'model.json'}: not a valid manifest \\(ValueError: golden "
                                         ".* has no sha256\\)$"):
        load(model_copy)


def test_bad_key_files_are_one_line(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    version, _ = signed
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(ModelError, match=f"^model.trusted_keys: {junk}: cannot read a PEM public key"):
        load(version, (junk,))
    with pytest.raises(ModelError, match=f"^--sign-key {junk}: cannot read an unencrypted PEM private key"):
        read_signing_key(junk)


def test_trusted_keys_in_config_toml_are_relative_to_the_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text('[model]\ntrusted_keys = ["keys/release.pub.pem", "/abs/other.pem"]\n')
    loaded = load_config(config, environ={})
    assert loaded.model.trusted_keys == (tmp_path / "etc" / "keys" / "release.pub.pem", Path("/abs/other.pem"))


def _refresh_digest(version: Path) -> None:
    import hashlib

    text = (version / "model.json").read_bytes()
    (version / "model.json.sha256").write_text(hashlib.sha256(text).hexdigest() + "  model.json\n")


# -- from a bucket --------------------------------------------------------------------


def test_fetching_checks_the_signature_before_anything_is_kept(
        make_config: Callable[..., Config], s3: Server, tmp_path: Path,  # noqa: F811
        signed: tuple[Path, Path]) -> None:
    version, public = signed
    _, other = make_key_pair(tmp_path, "other")
    bucket = Bucket(s3, "models-signed", tmp_path)
    bucket.create()
    publish(bucket, version)
    refused = model_config(make_config, bucket, tmp_path, model__trusted_keys=[str(other)])
    with pytest.raises(ModelFetchRefused, match=f"^model.url: {bucket.url(MODEL_KEY)}/1/model.json.sig is not a "
                                                f"valid signature of model.json by any of model.trusted_keys \\({other}\\); "
                                                "refusing this model$"):
        model_source(refused.model, refused.bucket)
    assert not list((tmp_path / "cache").glob("*/1-*"))
    config = model_config(make_config, bucket, tmp_path, model__trusted_keys=[str(public)])
    fetched = model_source(config.model, config.bucket)
    assert (fetched / "model.json.sig").read_bytes() == (version / "model.json.sig").read_bytes()
    model = load(fetched, (public,))
    model.runtime.close()


def test_an_unsigned_model_in_the_bucket_is_refused_when_keys_are_trusted(
        make_config: Callable[..., Config], s3: Server, tmp_path: Path,  # noqa: F811
        signed: tuple[Path, Path]) -> None:
    version, public = signed
    (version / "model.json.sig").unlink()
    bucket = Bucket(s3, "models-unsigned", tmp_path)
    bucket.create()
    publish(bucket, version)
    config = model_config(make_config, bucket, tmp_path, model__trusted_keys=[str(public)])
    with pytest.raises(ModelFetchRefused, match="/1/model.json.sig is missing and model.trusted_keys is set; "
                                                "refusing this model$"):
        model_source(config.model, config.bucket)


def test_a_new_copy_never_replaces_the_verified_one_in_place(
        make_config: Callable[..., Config], s3: Server, tmp_path: Path, model_copy: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    to_format_2(model_copy, TIMES)
    bucket = Bucket(s3, "models-atomic", tmp_path)
    bucket.create()
    publish(bucket, model_copy)
    config = model_config(make_config, bucket, tmp_path)
    first = model_source(config.model, config.bucket)
    first_manifest = (first / "model.json").read_bytes()

    # The bucket's model changes (same version number); the process dies as it switches over.
    rewrite_manifest(model_copy, lambda m: m.update(created_at="2026-11-30T00:00:00Z"))
    _refresh_digest(model_copy)
    publish(bucket, model_copy)
    real_replace = os.replace

    def crash_at_the_switch(src: Any, dst: Any) -> None:
        if Path(dst).name == "verified.json":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_the_switch)
    assert model_source(config.model, config.bucket) == first  # the failed fetch falls back to the verified copy
    monkeypatch.setattr(os, "replace", real_replace)
    # The previous verified copy is still whole and still the one named.
    marker = json.loads((first.parent / "verified.json").read_text())
    assert marker["dir"] == first.name and (first / "model.json").read_bytes() == first_manifest
    model = load(first)
    model.runtime.close()

    second = model_source(config.model, config.bucket)
    assert second != first and (second / "model.json").read_bytes() == (model_copy / "model.json").read_bytes()
    assert json.loads((second.parent / "verified.json").read_text())["dir"] == second.name
    assert not first.exists()  # removed only once nothing points at it


def test_a_cache_marker_from_before_names_its_version_directory(tmp_path: Path, model_copy: Path) -> None:
    from appliance.modelfetch import cached_model_dir
    import hashlib

    url = "s3://b/models/tiny"
    cache = tmp_path / "cache" / hashlib.sha256(url.encode()).hexdigest()[:16]
    cache.mkdir(parents=True)
    os.rename(model_copy, cache / "1")
    (cache / "verified.json").write_text(json.dumps({"version": 1, "url": url, "verified_at": 0}))
    assert cached_model_dir(url, tmp_path / "cache") == cache / "1"


def test_convert_sign_key_is_a_documented_option(capsys: pytest.CaptureFixture[str]) -> None:
    from convert.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--sign-key" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--sign-key" in capsys.readouterr().out


def test_signature_file_is_base64_of_an_ed25519_signature(signed: tuple[Path, Path]) -> None:
    version, _ = signed
    text = (version / "model.json.sig").read_text()
    assert text.endswith("\n") and len(base64.b64decode(text.strip(), validate=True)) == 64


def test_check_config_refuses_an_unsigned_model_as_serve_would(signed: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    version, public = signed
    config = tmp_path / "signed.toml"
    config.write_text(f'[model]\npath = "{version}"\ntrusted_keys = ["{public}"]\n[runtime]\nbackend = "onnxruntime"\n')
    command = [sys.executable, "-m", "appliance", "check-config", "--config", str(config)]
    ok = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    (version / "model.json.sig").unlink()
    refused = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"appliance: error: {version / 'model.json.sig'}: missing; model.trusted_keys is set")
