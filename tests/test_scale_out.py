"""Many instances, one clinic: three real `appliance serve` processes on one PostgreSQL database and one bucket.

The clients switch instance on every call, as behind a round-robin load
balancer, and the tests check the behaviour of one box: case ids never repeat,
a case logged through one instance is listed, updated and released through
another, `kill -9` of an instance loses no acknowledged record, and a database
restart gives clean 503s with Retry-After, then recovery, with nothing lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.cases import log_case, raise_case_counter
from appliance.storage import StoredImage, open_store

from .buckets import Bucket, Server
from .conftest import encode, photo
from .postgres import PostgresServer
from .test_serve import ROOT, free_port, running, wait_ready

USER = "user001"
JPEGS = [encode(photo(320, 240, seed=seed)) for seed in range(4)]


@dataclass
class Cluster:
    """The instances' ports and processes, the shared bucket and the database they all use."""

    ports: list[int]
    procs: list[Any]
    bucket: Bucket
    database_url: str

    def call(self, instance: int, method: str, path: str, body: Any = None, *,
             user: str = USER) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One request to one instance: (status, JSON body, headers)."""
        return call(self.ports[instance], method, path, body, user=user)


def call(port: int, method: str, path: str, body: Any = None, *, user: str = USER,
         timeout_s: float = 30) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"X-User-Id": user}
    data: bytes | None = None
    if isinstance(body, bytes):  # a photo: multipart upload
        boundary = "scaleBOUNDARY"
        data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif method == "POST":
        data = b""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@contextlib.contextmanager
def started_cluster(tmp_path: Path, model: Path, database_url: str, extra: str = "") -> Iterator[Cluster]:
    """Three instances on one database and one moto bucket (images under images/), `extra` TOML added to each."""
    s3 = Server("s3", tmp_path / "s3")
    s3.start()
    try:
        bucket = Bucket(s3, "clinic", tmp_path)
        bucket.create()
        ports = [free_port() for _ in range(3)]
        with contextlib.ExitStack() as stack:
            procs = []
            for i, port in enumerate(ports):
                home = tmp_path / f"instance{i}"
                home.mkdir()
                config = home / "config.toml"
                config.write_text(
                    f'[server]\nport = {port}\n[model]\npath = "{model}"\n'
                    f'[storage]\nbackend = "postgres"\nroot = "{home / "data"}"\n'
                    f'images = "bucket"\nimages_url = "{bucket.url("images")}"\n'
                    f"[bucket]\n{bucket.toml()}{extra}"
                )
                procs.append(stack.enter_context(running(config, DATABASE_URL=database_url)))
            for proc, port in zip(procs, ports, strict=True):
                wait_ready(proc, port)
            yield Cluster(ports, procs, bucket, database_url)
    finally:
        s3.stop()


@pytest.fixture
def cluster(tmp_path: Path, tiny_model_dir: Path, database_url: str) -> Iterator[Cluster]:
    with started_cluster(tmp_path, tiny_model_dir, database_url) as started:
        yield started


def stored_image_ids(database_url: str, root: Path, user: str = USER) -> set[str]:
    """The image ids the database holds for `user`, read by a store of our own on the same database."""
    store = open_store("postgres", root, database_url=database_url)
    try:
        return {record["image_id"] for record in store.list_images(user)}
    finally:
        store.close()


def test_case_ids_never_repeat_across_instances(cluster: Cluster) -> None:
    """Three clients, each switching instance on every call, half next-id and half photos without a case id."""
    issued: list[str] = []
    failures: list[Any] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        for n in range(12):
            instance = (number + n) % 3
            if n % 2:
                status, body, _ = cluster.call(instance, "POST", "/cases/next-id")
            else:
                status, body, _ = cluster.call(instance, "POST", "/check-image", JPEGS[n % len(JPEGS)])
            with lock:
                (issued if status == 200 else failures).append(body["case_id"] if status == 200 else (status, body))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(issued, key=int) == [str(10000 + n) for n in range(36)]  # no repeat, no gap


def test_a_case_logged_on_one_instance_is_listed_updated_and_released_on_others(cluster: Cluster) -> None:
    status, photo_answer, _ = cluster.call(0, "POST", "/check-image", JPEGS[0])
    assert status == 200
    case_id, image_id = photo_answer["case_id"], photo_answer["image_id"]
    # The image went to the bucket, under the user's folder, before the answer.
    assert cluster.bucket.keys("images") == [f"images/{USER}/{image_id}.jpg"]

    assert cluster.call(1, "POST", "/cases", {"case_id": case_id, "status": "pending", "age": "54"})[:2] == (
        200, {"status": "ok", "message": "logged", "case_id": case_id, "case_status": "pending"})
    status, listed, _ = cluster.call(2, "GET", "/cases")
    assert status == 200
    [case] = listed["cases"]
    assert (case["case_id"], case["image_ids"], case["status"], case["age"]) == (case_id, [image_id], "pending", "54")

    assert cluster.call(0, "PUT", f"/cases/{case_id}", {"status": "Confirmed"})[:2] == (
        200, {"status": "ok", "case_id": case_id})
    for instance in (1, 2, 0):  # the same answer whichever instance is asked
        assert [c["status"] for c in cluster.call(instance, "GET", "/cases")[1]["cases"]] == ["Confirmed"]

    # Release: only the latest issued id, only while unused, whoever issued it.
    status, issued, _ = cluster.call(1, "POST", "/cases/next-id")
    assert (status, issued) == (200, {"case_id": str(int(case_id) + 1)})
    assert cluster.call(2, "POST", "/cases/release-id", {"case_id": case_id})[:2] == (
        200, {"status": "skipped", "reason": "counter_mismatch", "last_case_id": issued["case_id"]})
    assert cluster.call(0, "POST", "/cases/release-id", issued)[:2] == (200, {"status": "ok", **issued})
    assert cluster.call(2, "POST", "/cases/release-id", {"case_id": case_id})[:2] == (
        200, {"status": "skipped", "reason": "case_in_use"})
    assert cluster.call(1, "POST", "/cases/next-id")[:2] == (200, issued)  # given back, issued again


def _load(cluster: Cluster, instances: list[int], stop: threading.Event,
          acknowledged: list[str], statuses: list[tuple[int, dict[str, Any], dict[str, str]]]) -> None:
    """Photos round-robin over `instances` until `stop`; ids answered 200 go to `acknowledged`."""
    n = 0
    while not stop.is_set():
        port = cluster.ports[instances[n % len(instances)]]
        n += 1
        try:
            status, body, headers = call(port, "POST", "/check-image", JPEGS[n % len(JPEGS)], timeout_s=15)
        except OSError:  # an instance killed mid-request: the client got no answer, so nothing was acknowledged
            continue
        statuses.append((status, body, headers))
        if status == 200:
            acknowledged.append(body["image_id"])


def test_kill_9_of_one_instance_under_load_loses_no_acknowledged_record(cluster: Cluster, tmp_path: Path) -> None:
    stop, acknowledged, statuses = threading.Event(), [], []
    clients = [threading.Thread(target=_load, args=(cluster, [0, 1, 2], stop, acknowledged, statuses))
               for _ in range(3)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster.procs[2].send_signal(signal.SIGKILL)
    cluster.procs[2].wait(10)
    killed_at = len(acknowledged)
    while len(acknowledged) < killed_at + 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in clients:
        thread.join()
    assert len(acknowledged) >= killed_at + 15, "the surviving instances stopped answering"
    assert [s for s in statuses if s[0] != 200] == []
    assert set(acknowledged) <= stored_image_ids(cluster.database_url, tmp_path / "reader")
    objects = set(cluster.bucket.keys("images"))
    assert {f"images/{USER}/{image_id}.jpg" for image_id in acknowledged} <= objects


def test_a_database_restart_under_load_gives_clean_503s_then_recovers(
    cluster: Cluster, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    stop, acknowledged, statuses = threading.Event(), [], []
    clients = [threading.Thread(target=_load, args=(cluster, [0, 1, 2], stop, acknowledged, statuses))
               for _ in range(2)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    postgres_server.stop()
    try:
        outage_start = len(statuses)
        while not any(s[0] == 503 for s in statuses[outage_start:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = [call(port, "GET", "/ready")[0] for port in cluster.ports]
    finally:
        postgres_server.start()
    while not all(s[0] == 200 for s in statuses[-6:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    recovered_at = len(acknowledged)
    while len(acknowledged) < recovered_at + 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in clients:
        thread.join()

    assert ready == [503, 503, 503]
    refused = [s for s in statuses if s[0] != 200]
    assert refused, "the outage was never seen"
    assert {s[0] for s in refused} == {503}
    assert {s[1]["detail"] for s in refused} <= {"the database does not answer; try again later"}
    assert all(int(s[2]["Retry-After"]) > 0 for s in refused)
    assert len(acknowledged) >= recovered_at + 6, "no instance recovered after the database came back"
    assert [call(port, "GET", "/ready")[0] for port in cluster.ports] == [200, 200, 200]
    assert set(acknowledged) <= stored_image_ids(cluster.database_url, tmp_path / "reader")


def test_a_box_moves_in_with_migrate_store_and_every_instance_serves_its_data(
    cluster: Cluster, tmp_path: Path
) -> None:
    box = tmp_path / "box"
    store = open_store("sqlite", box / "data")
    try:
        store.save_image(USER, StoredImage("old-img", JPEGS[1], ".jpg"), {
            "case_id": "10007", "status": "success", "created_at": "2026-01-01T10:00:00+00:00"})
        log_case(store, USER, {"entry_type": "case", "case_id": "10007", "status": "Confirmed",
                               "created_at": "2026-01-01T10:05:00+00:00"})
        raise_case_counter(store, USER, 10007)
    finally:
        store.close()
    config = box / "config.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nroot = "{box / "data"}"\n'
                      f'images_url = "{cluster.bucket.url("images")}"\n[bucket]\n{cluster.bucket.toml()}')
    command = [sys.executable, "-m", "appliance", "migrate-store", "--config", str(config), "--to", "postgres",
               "--to-root", str(box / "moved"), "--images-to-bucket"]
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DATABASE_URL": cluster.database_url}
    first = subprocess.run(command, capture_output=True, text=True, env=environ, cwd=ROOT, timeout=120)
    assert (first.returncode, first.stderr) == (0, "")
    assert "users 1; 3 copied, 0 already there; images 1 copied" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, env=environ, cwd=ROOT, timeout=120)
    assert (again.returncode, again.stderr) == (0, "")
    assert "users 1; 0 copied, 3 already there" in again.stdout

    assert f"images/{USER}/old-img.jpg" in cluster.bucket.keys("images")
    for instance in range(3):
        status, listed, _ = cluster.call(instance, "GET", "/cases")
        assert status == 200
        assert [(c["case_id"], c["status"], c["image_ids"]) for c in listed["cases"]] == [
            ("10007", "Confirmed", ["old-img"])]
    assert cluster.call(2, "POST", "/cases/next-id")[:2] == (200, {"case_id": "10008"})  # the box's counter moved in


def test_the_instances_drain_one_shared_outbox_into_the_bucket(
    tmp_path: Path, tiny_model_dir: Path, database_url: str
) -> None:
    """Sync on in every instance, one box_id for the group: whatever instance answered, it all reaches the bucket."""
    sync = '[sync]\nenabled = true\nurl = "s3://clinic/sync"\nbox_id = "clinic-group"\npoll_interval_s = 0.2\n'
    with started_cluster(tmp_path, tiny_model_dir, database_url, sync) as cluster:
        answers = [cluster.call(n % 3, "POST", "/check-image", JPEGS[n % len(JPEGS)])[1] for n in range(6)]
        case_id = answers[0]["case_id"]
        assert cluster.call(1, "POST", "/cases", {"case_id": case_id, "status": "Confirmed"})[0] == 200
        day = time.strftime("%Y/%m/%d", time.gmtime())  # the records' UTC day
        wanted = {f"sync/clinic-group/images/{USER}/{day}/{a['image_id']}{suffix}"
                  for a in answers for suffix in (".jpg", ".json")}
        wanted.add(f"sync/clinic-group/cases/{USER}/{case_id}.json")
        deadline = time.monotonic() + 60
        while not wanted <= set(cluster.bucket.keys("sync")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wanted - set(cluster.bucket.keys("sync")) == set()
        case = json.loads(cluster.bucket.read(f"sync/clinic-group/cases/{USER}/{case_id}.json")[0])
        assert (case["status"], case["image_ids"]) == ("Confirmed", [answers[0]["image_id"]])
        while _outbox_jobs(database_url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _outbox_jobs(database_url) == 0


def _outbox_jobs(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert row is not None
    return int(row[0])
