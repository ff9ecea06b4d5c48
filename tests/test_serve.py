"""The real `appliance serve` process: start-up failures, durability under kill -9, clean SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from collections.abc import Iterator

import pytest

from appliance.storage import open_store

from .conftest import encode, photo, rewrite_manifest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, model: Path, backend: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\n[model]\npath = "{model}"\n'
        f'[storage]\nbackend = "{backend}"\nroot = "{tmp_path / "data"}"\n'
    )
    return config


@contextlib.contextmanager
def running(config: Path, **environ: str) -> Iterator[subprocess.Popen[bytes]]:
    """`appliance serve` in a subprocess, its output in server.log beside the config, killed at exit."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environ}
    with open(config.parent / "server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait(10)


def port_of(config: Path) -> int:
    return int(config.read_text().split("port = ")[1].split("\n")[0])


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not become ready")


def post_image(port: int, data: bytes) -> dict:
    boundary = "xBOUNDARYx"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/check-image", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "X-User-Id": "user001"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def post_json(port: int, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST",
                                     headers={"X-User-Id": "user001"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("backend", ["sqlite", "disk"])
def test_an_answered_image_survives_kill_9(tmp_path: Path, tiny_model_dir: Path, backend: str) -> None:
    config = write_config(tmp_path, tiny_model_dir, backend)
    port = port_of(config)
    data = encode(photo(seed=9))
    with running(config) as proc:
        wait_ready(proc, port)
        answer = post_image(port, data)
        proc.send_signal(signal.SIGKILL)  # the instant after the answer
        proc.wait(10)
    with running(config) as proc:
        wait_ready(proc, port)
        assert post_json(port, "/cases/next-id") == {"case_id": "10001"}  # the counter advanced durably too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    store = open_store(backend, tmp_path / "data")
    [record] = store.list_images("user001")
    assert record["image_id"] == answer["image_id"] and record["case_id"] == "10000"
    assert store.read_image("user001", answer["image_id"]) == data
    store.close()


def test_start_up_refuses_a_tampered_model(tmp_path: Path, model_copy: Path) -> None:
    rewrite_manifest(model_copy, lambda m: m["golden"][0].update(probabilities=[1, 0, 0, 0, 0, 0, 0]))
    config = write_config(tmp_path, model_copy, "sqlite")
    with running(config) as proc:
        assert proc.wait(60) == 1
    last = (tmp_path / "server.log").read_text().splitlines()[-1]
    assert last.startswith("appliance: error: self-check failed for openvino-fp32/fast on golden/0.jpg: max |dp| ")


def test_start_up_names_the_convert_command_for_a_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"PK")
    proc = subprocess.run([sys.executable, "-m", "appliance", "serve", "--config", str(write_config(tmp_path, checkpoint, "sqlite"))],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": os.environ.get("PATH", "")}, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"appliance: error: model.path points at a PyTorch checkpoint ({checkpoint}); convert it first: "
        f"python -m convert {checkpoint} --name best --out models --calibration-dir PHOTOS, "
        "then set model.path (MODEL_PATH) to models/best")
