"""Configuration: the shipped file, overrides, and errors that name the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config, parse_config
from appliance.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_equals_the_defaults() -> None:
    shipped = load_config(ROOT / "config.toml", environ={})
    defaults = parse_config({})
    # Paths in the file are resolved against its directory.
    assert shipped.model.path == ROOT / "models/demo"
    assert shipped.storage.root == ROOT / "data"
    assert shipped.server == defaults.server
    assert (shipped.auth, shipped.limits) == (defaults.auth, defaults.limits)
    assert shipped.runtime == defaults.runtime
    assert (shipped.inference, shipped.imaging) == (defaults.inference, defaults.imaging)


def test_every_key_is_in_config_toml_with_a_comment() -> None:
    lines = (ROOT / "config.toml").read_text().splitlines()
    defaults = parse_config({})
    tables = {
        "server": defaults.server, "auth": defaults.auth, "limits": defaults.limits, "model": defaults.model, "inference": defaults.inference,
        "imaging": defaults.imaging, "storage": defaults.storage,
        "bucket": defaults.bucket, "sync": defaults.sync,
        **{f"runtime.{name}": cfg for name, cfg in defaults.runtime.options.items()},
    }
    keys = {table: list(vars(cfg)) for table, cfg in tables.items()}
    keys["runtime"] = ["backend"]
    for table, names in keys.items():
        start = lines.index(f"[{table}]")
        for name in names:
            index = next(i for i in range(start + 1, len(lines)) if re.match(rf"{name} = ", lines[i]))
            assert lines[index - 1].startswith("#"), f"[{table}] {name} has no comment above it"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"prot": 1}}, "server.prot: unknown key (expected one of allow_insecure, allow_plain_http, "
                                  "allowed_origins, body_timeout_s, host, idle_timeout_s, max_body_bytes, "
                                  "max_header_bytes, max_headers, max_json_bytes, port, shutdown_timeout_s, "
                                  "tls_cert_file, tls_key_file)"),
        ({"limits": {"requests_per_minute": -1}}, "limits.requests_per_minute: expected 0 (off) or more; got -1"),
        ({"limits": {"max_concurrent_bodies": 0}}, "limits.max_concurrent_bodies: expected a positive number; got 0"),
        ({"server": {"body_timeout_s": 0}}, "server.body_timeout_s: expected a positive number of seconds; got 0.0"),
        ({"auth": {"keys": "x"}}, "auth.keys: unknown key (expected one of keys_file, max_failures_per_minute)"),
        ({"servr": {}}, "servr: unknown key (expected one of auth, bucket, imaging, inference, limits, model, privacy, "
                        "runtime, server, storage, sync)"),
        ({"server": {"port": "eighty"}}, "server.port: expected a whole number; got 'eighty'"),
        ({"server": {"port": 0}}, "server.port: expected a positive number; got 0"),
        ({"runtime": {"openvino": {"device": "gpu0"}}}, "runtime.openvino.device: expected one of CPU, GPU, NPU, AUTO; got 'gpu0'"),
        ({"runtime": {"backend": "tensorflow"}}, "runtime.backend: expected one of onnxruntime, openvino; got 'tensorflow'"),
        ({"storage": {"backend": "s3"}}, "storage.backend: expected one of sqlite, disk, postgres; got 's3'"),
        ({"imaging": {"conf_threshold": 2}}, "imaging.conf_threshold: expected a number from 0 to 1; got 2.0"),
        ({"imaging": {"blur_full_resolution": "maybe"}}, "imaging.blur_full_resolution: expected true or false; got 'maybe'"),
        ({"server": {"tls_cert_file": "c.pem"}}, "server.tls_cert_file and server.tls_key_file: expected both or neither"),
        ({"runtime": {"onnxruntime": {"providers": "CPUExecutionProvider", "x": 1}}},
         "runtime.onnxruntime.x: unknown key (expected one of allow_fallback, providers, spinning, threads)"),
    ],
)
def test_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value) == message


def test_old_environment_variables_override_the_file(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.toml", environ={
        "MODEL_PATH": "/srv/models/ham", "BLUR_THRESHOLD": "55.5", "CONF_THRESHOLD": "0.7",
        "STORAGE_ROOT": "/srv/data", "CASE_ID_START": "500", "BACKSERVER_HOST": "0.0.0.0",
        "BACKSERVER_PORT": "9000", "MODEL_DEVICE": "cuda",
        "ALLOWED_ORIGINS": "https://app.clinic.example, http://10.0.0.5:8080",
        "APPLIANCE_SERVER__ALLOW_PLAIN_HTTP": "true",  # 0.0.0.0 without TLS_CERT_FILE: tests/test_exposure.py
    })
    assert config.server.allowed_origins == ("https://app.clinic.example", "http://10.0.0.5:8080")
    assert config.model.path == Path("/srv/models/ham")
    assert (config.imaging.blur_threshold, config.imaging.conf_threshold) == (55.5, 0.7)
    assert (config.storage.root, config.storage.case_id_start) == (Path("/srv/data"), 500)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    assert config.runtime.backend == "onnxruntime"
    assert config.runtime.selected.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    # MODEL_DEVICE=cpu, in many old unit files, keeps the (faster) default runtime.
    assert load_config(ROOT / "config.toml", environ={"MODEL_DEVICE": "cpu"}).runtime.backend == "openvino"


def test_appliance_variables_override_any_key() -> None:
    config = load_config(None, environ={
        "APPLIANCE_STORAGE__BACKEND": "disk", "APPLIANCE_RUNTIME__BACKEND": "openvino",
        "APPLIANCE_RUNTIME__OPENVINO__DEVICE": "AUTO", "APPLIANCE_INFERENCE__MAX_BATCH": "8",
        "APPLIANCE_RUNTIME__ONNXRUNTIME__PROVIDERS": '["CPUExecutionProvider"]',
    })
    assert config.storage.backend == "disk"
    assert config.runtime.backend == "openvino" and config.runtime.selected.device == "AUTO"
    assert config.inference.max_batch == 8


def test_model_url_sets_model_url_and_is_checked() -> None:
    assert load_config(None, environ={"MODEL_URL": "s3://models/derm"}).model.url == "s3://models/derm"
    with pytest.raises(ConfigError, match=r"^model.url: expected s3://, gs://, az:// or an https URL"):
        load_config(None, environ={"MODEL_URL": "ftp://models/derm"})


def test_bad_old_variables_refuse_to_start() -> None:
    with pytest.raises(ConfigError, match="^MODEL_DEVICE: expected one of cpu, cuda; got 'mps'$"):
        load_config(None, environ={"MODEL_DEVICE": "mps"})


def test_check_config_command(tmp_path: Path, tiny_model_dir: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[model]\npath = "{tiny_model_dir}"\n')
    run = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(good)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("config OK: model tiny v1 (openvino-fp32/fast, DEMO) from ")
    bad = tmp_path / "bad.toml"
    bad.write_text('[runtime.openvino]\ndevice = "gpu0"\n')
    run = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(bad)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 1
    assert run.stderr == "appliance: error: runtime.openvino.device: expected one of CPU, GPU, NPU, AUTO; got 'gpu0'\n"


def test_check_config_names_the_keys_and_their_roles(tmp_path: Path, tiny_model_dir: Path) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text("phones:k1\nlead:k2:admin\nprometheus:k3:metrics\n")
    config = tmp_path / "keys.toml"
    config.write_text(f'[model]\npath = "{tiny_model_dir}"\n[auth]\nkeys_file = "{keys}"\n')
    run = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(config)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().endswith("over http; API keys phones, lead (admin), prometheus (metrics)")
    open_api = tmp_path / "open.toml"
    open_api.write_text(f'[model]\npath = "{tiny_model_dir}"\n')
    run = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(open_api)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.stdout.rstrip().endswith("over http; API open (no keys)")


def test_check_config_with_a_model_url_does_not_need_the_network(tmp_path: Path) -> None:
    config = tmp_path / "bucket.toml"
    config.write_text(f'[model]\nurl = "s3://models/ham10000"\ncache_dir = "{tmp_path / "cache"}"\n')
    run = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(config)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(
        "config OK: model not checked from s3://models/ham10000 (fetched at start; nothing cached yet); ")


def test_check_config_finds_the_postgres_dsn_as_start_up_would(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "pg.toml"
    config.write_text(f'[model]\npath = "{tiny_model_dir}"\n[storage]\nbackend = "postgres"\n'
                      f'root = "{tmp_path / "data"}"\n')
    command = [sys.executable, "-m", "appliance", "check-config", "--config", str(config)]
    run = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] + "\n" == (  # after the tiny model's format-1 warning
        'appliance: error: storage.backend = "postgres" needs a DSN: set DATABASE_URL, storage.database_url, '
        "storage.database_url_file or the systemd credential database-url\n")
    environ = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://clinic:s3cret@db.example:6543/derm"}
    run = subprocess.run(command, capture_output=True, text=True, env=environ)
    assert run.returncode == 0, run.stderr
    assert f"; store postgres db.example:6543/derm, images in {tmp_path / 'data'}/images; " in run.stdout
    assert "s3cret" not in run.stdout  # the database is not asked either: check-config needs no network
