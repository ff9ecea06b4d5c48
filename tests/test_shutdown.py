"""SIGTERM on the real `appliance serve`: stop accepting, finish the request in flight, flush, exit 0; JSON logs."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

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
    head, body = upload_request(encode(photo(1600, 1200, seed=4)), "drain-test-1")
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
                                 "duration_ms", "key", "client", "user", "model", "model_version", "served_path"}
    assert (request_line["model"], request_line["model_version"]) == ("tiny", "1")  # which model answered (issue 14)
    assert any(line["msg"].startswith("no API key configured") and line["level"] == "WARNING" for line in lines)


def upload_request(data: bytes, request_id: str) -> tuple[bytes, bytes]:
    """The head and body of a raw HTTP/1.1 `POST /check-image` of `data`."""
    boundary = "drainBOUNDARY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /check-image HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: user001\r\nX-Request-Id: {request_id}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head, body


def send_half_then_sigterm(proc: Any, port: int, client: socket.socket, head: bytes, body: bytes) -> None:
    """Send the head and half the body; once the server reads it, SIGTERM; wait until it stops listening."""
    client.sendall(head + body[: len(body) // 2])
    deadline = time.monotonic() + 30
    while _bodies_in_progress(port) == 0:  # the handler holds the upload, waiting for the rest
        assert time.monotonic() < deadline, "the upload never reached its handler"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    while not refuses_connections(port):
        assert time.monotonic() < deadline, "the server kept accepting after SIGTERM"
        time.sleep(0.02)
    assert proc.poll() is None  # still draining


def test_sigterm_lets_an_upload_still_arriving_finish(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Half a photo is on the wire when SIGTERM lands: the rest is still read, and the answer is 200.

    Meanwhile a kept-alive connection gets one more answer, which closes it: no client can
    keep starting requests and hold the drain open.
    """
    config = write_config(tmp_path, tiny_model_dir, "disk")
    port = port_of(config)
    head, body = upload_request(encode(photo(800, 600, seed=5)), "drain-test-2")
    with running(config) as proc:
        wait_ready(proc, port)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as kept, \
                socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            status_line, headers, _ = _get(kept, "/health")
            assert status_line == "HTTP/1.1 200 OK" and headers.get("connection", "keep-alive") == "keep-alive"
            send_half_then_sigterm(proc, port, client, head, body)
            status_line, headers, _ = _get(kept, "/health")  # draining: answered, then closed
            assert (status_line, headers["connection"]) == ("HTTP/1.1 200 OK", "close")
            assert kept.recv(1) == b""
            client.sendall(body[len(body) // 2:])
            status_line, headers, payload = _read_response(client)
        assert proc.wait(30) == 0
    assert (status_line, headers["x-request-id"]) == ("HTTP/1.1 200 OK", "drain-test-2")
    store = open_store("disk", tmp_path / "data")
    assert [r["image_id"] for r in store.list_images("user001")] == [json.loads(payload)["image_id"]]
    store.close()


def test_an_upload_that_stops_arriving_is_cut_at_the_drain_timeout(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A client that never sends the rest does not hold the shutdown: cut after the timeout, nothing stored."""
    config = write_config(tmp_path, tiny_model_dir, "sqlite")
    config.write_text(config.read_text().replace("[server]\n", "[server]\nshutdown_timeout_s = 3.0\n"))
    port = port_of(config)
    head, body = upload_request(encode(photo(800, 600, seed=6)), "drain-test-3")
    with running(config) as proc:
        wait_ready(proc, port)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            send_half_then_sigterm(proc, port, client, head, body)
            assert proc.wait(30) == 0
            assert _read_response(client)[0] == ""  # the connection closed without an answer
    store = open_store("sqlite", tmp_path / "data")
    assert store.list_images("user001") == []
    store.close()
    assert not list((tmp_path / "data").rglob("*.jpg"))  # no image file without its record
    log = (tmp_path / "server.log").read_text()
    assert "1 request(s) still running after 3 s are cancelled" in log


def _get(conn: socket.socket, path: str) -> tuple[str, dict[str, str], bytes]:
    """One keep-alive GET on an open connection: (status line, headers, body), read by Content-Length."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += conn.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    while len(body) < int(headers["content-length"]):
        body += conn.recv(65536)
    return status_line, headers, body


def _bodies_in_progress(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        [line] = [line for line in response.read().decode().splitlines()
                  if line.startswith("appliance_bodies_in_progress ")]
    return int(float(line.split()[1]))


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
