"""Real bucket servers on 127.0.0.1 for the sync and model-fetch tests: moto (S3), azurite (Azure), gcp-storage-emulator (GCS).

Each server is a subprocess on a free loopback port that a test can stop and
start again on the same port (azurite and the GCS emulator keep their data
on disk across restarts; moto keeps it in memory). `Bucket` gives a test the
config that points the appliance at a bucket and an independent view of it
(listing, bytes, stored sha256 metadata), read without the appliance's code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

# The GCS emulator answers an XML-API PUT without the ETag real GCS sends (and
# obstore requires), drops x-goog-meta-* headers on that path, and parses a
# JSON object's body as JSON instead of storing its bytes. This wrapper fixes
# the three as GCS behaves (ETag = quoted hex MD5 of a single PUT; bytes kept
# as sent) and starts the emulator; nothing else changes.
GCS_WRAPPER = r"""
import hashlib, sys
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

read_data = server._read_data

def raw_for_xml_put(request_handler, query):
    if request_handler.command == "PUT" and not request_handler.path.startswith(("/storage/", "/upload/")):
        return server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    return read_data(request_handler, query)

server._read_data = raw_for_xml_put

original = objects.xml_upload

def xml_upload(request, response, storage, *args, **kwargs):
    meta = {k[len("x-goog-meta-"):]: v for k, v in request._request_handler.headers.items()
            if k.lower().startswith("x-goog-meta-")}
    original(request, response, storage, *args, **kwargs)
    if response.status.value == 200:
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        obj = storage.get_file_obj(bucket, name)
        if meta:
            obj["metadata"] = {k.lower(): v for k, v in meta.items()}
            storage.patch_object(bucket, name, obj)
        response["ETag"] = '"%s"' % hashlib.md5(request.data).hexdigest()

for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
        if handler is original:
            handlers[method] = xml_upload

host, port, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server.create_server(host, port, in_memory=False, data_dir=data_dir).run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start: {log.read_text(errors='replace')[-2000:]}")


@dataclass
class Server:
    """One emulator subprocess; stop() and start() keep its port (and, where it has one, its data dir)."""

    provider: str
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self.provider == "s3":
            return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        if self.provider == "gcs":
            return [sys.executable, "-c", GCS_WRAPPER, "127.0.0.1", str(self.port), str(self.workdir / "data")]
        azurite = shutil.which("azurite-blob")
        if azurite is None:
            raise RuntimeError("azurite-blob is not installed: npm install -g azurite (.ci/run does it)")
        return [azurite, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
                str(self.workdir / "data"), "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"]

    def start(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        log = self.workdir / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wait_port(self.port, self.proc, log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    @property
    def endpoint(self) -> str:
        base = f"http://127.0.0.1:{self.port}"
        return f"{base}/{AZURITE_ACCOUNT}" if self.provider == "azure" else base


class Bucket:
    """A bucket (or container) on a Server: the appliance's config for it, and a view of its objects."""

    def __init__(self, server: Server, name: str, credentials_dir: Path, *, key: str = AZURITE_KEY) -> None:
        self.server, self.name = server, name
        self.credentials_file = credentials_dir / f"{server.provider}-{name}.cred"
        if server.provider == "s3":
            self.credentials_file.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
        elif server.provider == "gcs":
            self.credentials_file.write_text(json.dumps({
                "gcs_base_url": server.endpoint, "disable_oauth": True, "client_email": "", "private_key": "",
                "private_key_id": ""}))
        else:
            self.credentials_file.write_text(key)

    def url(self, prefix: str = "") -> str:
        scheme = {"s3": "s3", "gcs": "gs", "azure": "az"}[self.server.provider]
        return f"{scheme}://{self.name}/{prefix}".rstrip("/")

    def config(self) -> dict[str, Any]:
        """`bucket__*` overrides for make_config."""
        return {"bucket__endpoint": self.server.endpoint, "bucket__allow_http": True, "bucket__region": "us-east-1",
                "bucket__credentials_file": str(self.credentials_file), "bucket__timeout_s": 10.0,
                "bucket__account": AZURITE_ACCOUNT if self.server.provider == "azure" else ""}

    def toml(self) -> str:
        """The same, as a [bucket] table."""
        return "".join(f"{k.split('__')[1]} = {json.dumps(v)}\n" for k, v in self.config().items())

    # -- a view of the bucket, without obstore or the appliance ------------------

    def create(self) -> None:
        if self.server.provider == "s3":
            self._request("PUT", f"/{self.name}")
        elif self.server.provider == "gcs":
            self._request("POST", "/storage/v1/b", json.dumps({"name": self.name}).encode(),
                          {"Content-Type": "application/json"})
        else:
            self._request("PUT", f"/{AZURITE_ACCOUNT}/{self.name}?restype=container")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket (optionally under `prefix`), sorted."""
        if self.server.provider == "s3":
            body = self._request("GET", f"/{self.name}?list-type=2&max-keys=1000&prefix={prefix}").decode()
            return sorted(part.split("</Key>")[0] for part in body.split("<Key>")[1:])
        if self.server.provider == "gcs":
            body = json.loads(self._request("GET", f"/storage/v1/b/{self.name}/o?prefix={prefix}"))
            return sorted(item["name"] for item in body.get("items", []))
        body = self._request("GET", f"/{AZURITE_ACCOUNT}/{self.name}?restype=container&comp=list&prefix={prefix}")
        return sorted(part.split("</Name>")[0] for part in body.decode().split("<Blob><Name>")[1:])

    def read(self, key: str) -> tuple[bytes, dict[str, str]]:
        """The object's bytes and its response headers (lower-cased names)."""
        if self.server.provider == "azure":
            path = f"/{AZURITE_ACCOUNT}/{self.name}/{key}"
        else:
            path = f"/{self.name}/{key}"
        return self._request("GET", path, with_headers=True)

    def put(self, key: str, data: bytes) -> None:
        """Upload an object directly (S3 only: used to publish models)."""
        assert self.server.provider == "s3"
        # An explicit type: urllib's default (form-urlencoded) makes moto parse the body as a form.
        self._request("PUT", f"/{self.name}/{key}", data, {"Content-Type": "application/octet-stream"})

    def stored_sha256(self, key: str) -> str | None:
        _, headers = self.read(key)
        return headers.get({"s3": "x-amz-meta-sha256", "gcs": "x-goog-meta-sha256",
                            "azure": "x-ms-meta-sha256"}[self.server.provider])

    def _request(self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None,
                 *, with_headers: bool = False) -> Any:
        headers = dict(headers or {})
        if self.server.provider == "s3":
            # moto refuses anonymous reads of objects but does not check signatures: any SigV4 header will do.
            headers["Authorization"] = ("AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, "
                                        "SignedHeaders=host, Signature=0")
        if self.server.provider == "azure":
            headers.update(_azure_shared_key(method, path, data, headers))
        request = urllib.request.Request(f"http://127.0.0.1:{self.server.port}{path}", data=data, method=method,
                                         headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return (body, {k.lower(): v for k, v in response.headers.items()}) if with_headers else body


def _azure_shared_key(method: str, path: str, data: bytes | None, headers: dict[str, str]) -> dict[str, str]:
    """The SharedKey headers Azure Blob (and azurite) require, for the well-known development account."""
    date = formatdate(usegmt=True)
    extra = {"x-ms-date": date, "x-ms-version": "2021-08-06"}
    resource, _, query = path.partition("?")
    canonical_resource = f"/{AZURITE_ACCOUNT}{resource}"
    params = sorted(p.split("=", 1) for p in query.split("&") if p)
    for name, value in params:
        canonical_resource += f"\n{name.lower()}:{urllib.request.unquote(value)}"
    length = str(len(data)) if data else ""
    string_to_sign = "\n".join([
        method, "", "", length, "", headers.get("Content-Type", ""), "", "", "", "", "", "",
        "".join(f"{k}:{v}\n" for k, v in sorted(extra.items())) + canonical_resource,
    ])
    signature = base64.b64encode(hmac.new(base64.b64decode(AZURITE_KEY), string_to_sign.encode(),
                                          hashlib.sha256).digest()).decode()
    return {**extra, "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{signature}"}
