"""SIGTERM on the real `appliance serve`: stop accepting, finish the request in flight, flush, exit 0; JSON logs."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
import urllib.request
from pathlib import Path

from appliance.storage import open_store

from .conftest import encode, photo
from .test_serve import port_of, running, wait_ready, write_config


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_sigterm_drains_the_request_in_flight(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A request classified but still writing when SIGTERM lands completes with 200; then exit 0.

    The test holds SQLite's write lock, so the request waits in its storage step for as long as the
    test needs (well under the store's 5 s busy timeout): no sleeps, no timing assumptions.
    """
    config = write_config(tmp_path, tiny_model_dir, "sqlite")
    port = port_of(config)
    data = encode(photo(1600, 1200, seed=4))
    boundary = "drainBOUNDARY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /check-image HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: user001\r\nX-Request-Id: drain-test-1\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with running(config) as proc:
        wait_ready(proc, port)
        lock = sqlite3.connect(tmp_path / "data" / "appliance.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # writers wait; the request will stop in its storage step
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(head + body)
            deadline = time.monotonic() + 30
            while _classified(port) == 0:  # body read, decoded, inferred: now waiting to store
                assert time.monotonic() < deadline, "the upload was never classified"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            while not refuses_connections(port):  # the listener closed: draining now
                assert time.monotonic() < deadline, "the server kept accepting after SIGTERM"
                time.sleep(0.02)
            assert proc.poll() is None  # still draining: the request is in flight
            lock.execute("ROLLBACK")
            lock.close()
            answer = _read_response(client)
        assert proc.wait(30) == 0
    status_line, headers, payload = answer
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["x-request-id"] == "drain-test-1"
    result = json.loads(payload)
    assert result["case_id"] == "10000" and result["status"] == "success"
    store = open_store("sqlite", tmp_path / "data")
    [record] = store.list_images("user001")
    assert record["image_id"] == result["image_id"]
    store.close()

    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    [request_line] = [line for line in lines if line.get("request_id") == "drain-test-1"]
    assert {k: request_line[k] for k in ("logger", "level", "method", "route", "status", "key", "user")} == {
        "logger": "appliance.access", "level": "INFO", "method": "POST", "route": "/check-image", "status": 200,
        "key": None, "user": "user001"}
    assert set(request_line) == {"ts", "level", "logger", "msg", "request_id", "method", "route", "status",
                                 "duration_ms", "key", "client", "user"}
    assert any(line["msg"].startswith("no API key configured") and line["level"] == "WARNING" for line in lines)


def _classified(port: int) -> int:
    # /v1/info, not /metrics: it never waits on the store thread, which the locked write is holding.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=10) as response:
        return int(json.loads(response.read())["inference"]["images"])


def _read_response(client: socket.socket) -> tuple[str, dict[str, str], bytes]:
    raw = b""
    while chunk := client.recv(65536):
        raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return status_line, headers, payload
