"""What only the postgres store has: many instances on one database, the DSN's sources, outages, the outbox table.

The store contract, the case rules and the sync tests run over postgres too
(tests/stores.py parametrizes them over BACKENDS); these add what two stores on
one database, a stopped server and a password in config.toml must do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from appliance.app import create_app
from appliance.cases import log_case, next_case_id, release_case_id, update_case
from appliance.config import load_config
from appliance.errors import ConfigError, StoreError, StoreUnavailable
from appliance.keys import STORE
from appliance.storage import open_store
from appliance.storage.config import resolve_database_url
from appliance.storage.crypto import Sealer
from appliance.storage.postgres import PostgresStore
from appliance.storage.pgschema import SCHEMA_VERSION
from appliance.sync.commands import sync_command
from appliance.sync.outbox import Job
from appliance.sync.pgoutbox import PgOutbox

from .buckets import Bucket, Server
from .conftest import encode, photo
from .postgres import PostgresServer
from .stores import JPEG, USER, case_record, save
from .test_api import check
from .test_sync import sync_overrides

KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
HEADERS = {"X-User-Id": USER, "X-User-Role": "gp"}
PASSWORD_REFUSED = ("storage.database_url: holds a password; put the password in DATABASE_URL, "
                    "storage.database_url_file or the systemd credential database-url, never in config.toml")


@pytest.fixture
def make_pg(database_url: str, tmp_path: Path) -> Iterator[Callable[..., PostgresStore]]:
    """`make_pg(name, **options)`: a postgres store on the test's database with a root of its own (an instance)."""
    opened: list[PostgresStore] = []

    def make(name: str = "a", **options: Any) -> PostgresStore:
        store = open_store("postgres", tmp_path / name, database_url=database_url, **options)
        assert isinstance(store, PostgresStore)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[call-overload]


# -- migrations -------------------------------------------------------------------


def test_two_instances_opening_a_fresh_database_at_once_migrate_it_once(
        make_pg: Callable[..., PostgresStore], database_url: str) -> None:
    barrier = threading.Barrier(4)

    def open_one(name: str) -> PostgresStore:
        barrier.wait()
        return make_pg(name)

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(open_one, ["a", "b", "c", "d"]))
    assert query(database_url, "SELECT version FROM schema_migrations ORDER BY version") == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert len({next_case_id(store, USER) for store in stores}) == 4


def test_a_schema_newer_than_the_code_is_refused(make_pg: Callable[..., PostgresStore], database_url: str) -> None:
    make_pg("a").close()
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 'later')")
    newer = (r"^postgres 127\.0\.0\.1:\d+/t_\d+: schema version 99 is newer than this appliance knows "
             f"\\({SCHEMA_VERSION}\\)$")
    with pytest.raises(StoreError, match=newer):
        make_pg("b")


# -- many instances, one user's writes ---------------------------------------------


def test_case_ids_never_repeat_across_instances(make_pg: Callable[..., PostgresStore]) -> None:
    stores = [make_pg("a"), make_pg("b")]

    def issue(k: int) -> list[str]:
        return [next_case_id(stores[k % 2], USER) for _ in range(15)]

    with ThreadPoolExecutor(8) as pool:
        issued = [case_id for batch in pool.map(issue, range(8)) for case_id in batch]
    assert sorted(issued, key=int) == [str(10000 + i) for i in range(120)]  # no repeat, no gap


def test_two_instances_updating_one_case_lose_no_update(make_pg: Callable[..., PostgresStore]) -> None:
    stores = [make_pg("a"), make_pg("b")]
    log_case(stores[0], USER, case_record("10000"))

    def update(k: int) -> None:
        assert update_case(stores[k % 2], USER, "10000", {f"field_{k}": k}) is not None

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(update, range(40)))
    record = stores[1].case_record(USER, "10000")
    assert record is not None and {f"field_{k}" for k in range(40)} <= set(record)


def test_release_across_instances_keeps_counter_mismatch_and_case_in_use(make_pg: Callable[..., PostgresStore]) -> None:
    a, b = make_pg("a"), make_pg("b")
    first, second = next_case_id(a, USER), next_case_id(b, USER)
    assert release_case_id(a, USER, first) == {"status": "skipped", "reason": "counter_mismatch",
                                               "last_case_id": second}
    log_case(a, USER, case_record(second))
    assert release_case_id(b, USER, second) == {"status": "skipped", "reason": "case_in_use"}
    third = next_case_id(a, USER)
    assert release_case_id(b, USER, third) == {"status": "ok", "case_id": third}
    assert next_case_id(a, USER) == third


def test_a_case_logged_on_one_instance_is_listed_on_another(make_pg: Callable[..., PostgresStore]) -> None:
    a, b = make_pg("a"), make_pg("b", images=None)
    save(a, "img-1", "10000")
    log_case(a, USER, case_record("10000", notes="from a"))
    assert b.image_record(USER, "img-1")["case_entry_type"] == "case"  # type: ignore[index]
    assert b.case_record(USER, "10000")["notes"] == "from a"  # type: ignore[index]


# -- saves, the journal and the sweep -----------------------------------------------


def test_a_pending_save_of_a_live_instance_is_not_swept_by_another(make_pg: Callable[..., PostgresStore],
                                                                   database_url: str) -> None:
    a, b = make_pg("a"), make_pg("b")
    reached, go_on = threading.Event(), threading.Event()
    put = a.images.put

    def slow_put(key: str, data: bytes) -> None:
        put(key, data)
        reached.set()
        assert go_on.wait(30)

    a.images.put = slow_put  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:
        saving = pool.submit(save, a, "img-1", "10000")
        assert reached.wait(30)
        assert query(database_url, "SELECT image_id FROM pending_images") == [("img-1",)]
        assert b.sweep_pending() == 0  # a's saver holds its pending row
        go_on.set()
        saving.result()
    assert a.read_image(USER, "img-1") == JPEG
    assert query(database_url, "SELECT count(*) FROM pending_images") == [(0,)]


# -- encryption: the key check lives in the database ---------------------------------


def test_the_key_check_is_shared_by_every_instance(make_pg: Callable[..., PostgresStore], database_url: str) -> None:
    a = make_pg("a", sealer=Sealer(base64.urlsafe_b64decode(KEY), "DATA_ENCRYPTION_KEY"))
    save(a, "img-1", "10000")
    log_case(a, USER, case_record("10000", notes="itchy"))
    rows = query(database_url, "SELECT record FROM images UNION ALL SELECT record FROM cases")
    assert all("itchy" not in body and json.loads(body)["v"] == 2 for (body,) in rows)
    stored = (a.root / "images" / USER / "img-1.bin").read_bytes()
    assert not stored.startswith(b"\xff\xd8") and JPEG[100:164] not in stored
    wrong = Sealer(bytes(32), "DATA_ENCRYPTION_KEY")
    with pytest.raises(StoreError, match=r"^storage: DATA_ENCRYPTION_KEY does not decrypt the key_check table of "
                                         r"postgres 127\.0\.0\.1:\d+/t_\d+: wrong key\?$"):
        make_pg("b", sealer=wrong)
    with pytest.raises(StoreError, match=r"^storage: postgres 127\.0\.0\.1:\d+/t_\d+ is encrypted \(the key_check "
                                         r"table of postgres 127\.0\.0\.1:\d+/t_\d+\) but storage\.encrypt "
                                         r"\(ENCRYPT_STORAGE\) is off; turn it on and set the key$"):
        make_pg("c")
    b = make_pg("d", sealer=Sealer(base64.urlsafe_b64decode(KEY), "DATA_ENCRYPTION_KEY"))
    assert b.case_record(USER, "10000")["notes"] == "itchy"  # type: ignore[index]


def test_a_record_moved_to_another_user_does_not_decrypt(make_pg: Callable[..., PostgresStore],
                                                         database_url: str) -> None:
    sealer = Sealer(base64.urlsafe_b64decode(KEY))
    a = make_pg("a", sealer=sealer)
    log_case(a, "alice", case_record("10000", user_id="alice"))
    log_case(a, "bob", case_record("10001", user_id="bob"))
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE cases SET record = (SELECT record FROM cases WHERE user_id = 'alice'),"
                     " case_id = '10000' WHERE user_id = 'bob'")
    with pytest.raises(StoreError, match="moved from another record$"):
        a.case_record("bob", "10000")


def test_encryption_is_not_turned_on_over_plain_records(make_pg: Callable[..., PostgresStore]) -> None:
    make_pg("a").close()
    plain = make_pg("b")
    log_case(plain, USER, case_record("10000"))
    with pytest.raises(StoreError, match=r"holds unencrypted data \(records in postgres .*\) and storage\.encrypt"):
        make_pg("c", sealer=Sealer(base64.urlsafe_b64decode(KEY)))


# -- the outbox table: leases ------------------------------------------------------------


def test_two_instances_never_lease_one_job(make_pg: Callable[..., PostgresStore]) -> None:
    a, b = make_pg("a", outbox=True), make_pg("b", outbox=True)
    for k in range(6):
        save(a, f"img-{k}", "10000")
    first, second = PgOutbox(a), PgOutbox(b)
    mine = first.due(1e12, 4)
    theirs = second.due(1e12, 4)
    assert len(mine) == 4 and len(theirs) == 2
    assert not {job.id for job in mine} & {job.id for job in theirs}
    assert second.due(1e12, 4) == []
    assert second.next_due_at() is not None and second.next_due_at() > 1e9  # type: ignore[operator]
    assert all(first.done(job) for job in mine)
    job: Job = theirs[0]
    second.failed(job, "GenericError: 503", now=1.0, retry_at=2.0)
    assert [j.id for j in first.due(3.0, 10)] == [job.id]  # a failed job's lease is gone
    assert (first.backlog().jobs, first.backlog().failing_jobs) == (2, 1)


# -- where the DSN comes from ---------------------------------------------------------------


def test_the_dsn_comes_from_the_environment_first(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("postgresql://file@db/x\n")
    environ = {"DATABASE_URL": "postgresql://env@db/x", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert resolve_database_url("postgresql://config@db/x", url_file, environ) == "postgresql://env@db/x"
    assert resolve_database_url("postgresql://config@db/x", url_file, {}) == "postgresql://config@db/x"
    assert resolve_database_url("", url_file, {}) == "postgresql://file@db/x"
    (tmp_path / "database-url").write_text("postgresql://app:secret@db/x?sslmode=verify-full\n")
    assert resolve_database_url("", None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == (
        "postgresql://app:secret@db/x?sslmode=verify-full")


def test_no_dsn_names_every_source() -> None:
    with pytest.raises(ConfigError, match='^storage.backend = "postgres" needs a DSN: set DATABASE_URL, '
                                          "storage.database_url, storage.database_url_file or the systemd "
                                          "credential database-url$"):
        resolve_database_url("", None, {})


def test_an_unreadable_dsn_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^storage.database_url_file: cannot read {tmp_path / 'absent'}: "
                                          "No such file or directory$"):
        resolve_database_url("", tmp_path / "absent", {})


def test_a_store_opens_from_a_dsn_file(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dsn").write_text(database_url + "\n")
    (tmp_path / "config.toml").write_text(
        f'[storage]\nbackend = "postgres"\nroot = "{tmp_path / "data"}"\ndatabase_url_file = "{tmp_path / "dsn"}"\n'
        "statement_timeout_s = 2.5\npool_size = 2\n")
    monkeypatch.delenv("DATABASE_URL")
    config = load_config(tmp_path / "config.toml", environ={})
    from appliance.storage import open_configured_store

    store = open_configured_store(config.storage, outbox=False)
    try:
        assert isinstance(store, PostgresStore) and (store.statement_timeout_s, store.pool_size) == (2.5, 2)
        assert store.database_url == database_url
        assert next_case_id(store, USER) == "10000"
    finally:
        store.close()


@pytest.mark.parametrize("url", ["postgresql://app:secret@db.example/clinic",
                                 "postgresql://app@db.example/clinic?password=secret",
                                 "host=db.example user=app password=secret dbname=clinic"])
def test_a_password_in_config_toml_is_refused(tmp_path: Path, url: str) -> None:
    (tmp_path / "config.toml").write_text(f'[storage]\nbackend = "postgres"\ndatabase_url = "{url}"\n')
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "config.toml", environ={})
    assert str(error.value) == PASSWORD_REFUSED


def test_a_dsn_without_password_in_config_toml_is_taken(tmp_path: Path) -> None:
    url = "postgresql://app@db.example/clinic?sslmode=verify-full&sslrootcert=/etc/appliance/db-ca.pem"
    (tmp_path / "config.toml").write_text(f'[storage]\nbackend = "postgres"\ndatabase_url = "{url}"\n')
    assert load_config(tmp_path / "config.toml", environ={}).storage.database_url == url


def test_a_statement_timeout_applies_to_every_connection(make_pg: Callable[..., PostgresStore]) -> None:
    store = make_pg("a", statement_timeout_s=0.25)
    assert store.pool is not None
    with store.pool.connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("250ms",)


def test_a_statement_timeout_is_a_503_but_not_an_outage(
        make_pg: Callable[..., PostgresStore], database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = make_pg("a", statement_timeout_s=0.25)
    with psycopg.connect(database_url, autocommit=True) as holder:
        # Another session holds the user's lock: this store's write waits past its statement timeout.
        holder.execute("SELECT pg_advisory_lock(hashtextextended('appliance-user:' || %s, 0))", (USER,))
        with caplog.at_level(logging.INFO, logger="appliance.storage"):
            with pytest.raises(StoreUnavailable, match="^the database does not answer; try again later$"):
                next_case_id(store, USER)
    assert store.health.down_since is None  # nothing logged as an outage, calls still wait normally
    assert [r.getMessage() for r in caplog.records if r.name == "appliance.storage"] == []
    assert next_case_id(store, USER) == "10000"  # the lock is gone with its session: nothing was issued before


@pytest.mark.parametrize("dsn", ["postgresql://u:p%zzsecret@127.0.0.1:1/db", "host=127.0.0.1 password=my secret"])
def test_a_dsn_libpq_cannot_parse_is_named_without_its_password(tmp_path: Path, dsn: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store("postgres", tmp_path / "a", database_url=dsn)
    assert caught.value.detail == (
        "the PostgreSQL DSN cannot be parsed (from DATABASE_URL, storage.database_url, storage.database_url_file "
        "or the credential database-url); expected postgresql://user@host:port/dbname?sslmode=... or key=value pairs")
    assert "secret" not in caught.value.detail


# -- outages through the API ----------------------------------------------------------------


async def ready_again(client: Any, within_s: float = 30.0) -> None:
    """Wait until /ready answers 200 again (the pool reconnecting by itself), failing after `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while (await client.get("/ready")).status != 200:
        assert asyncio.get_running_loop().time() < deadline, "the store did not recover"
        await asyncio.sleep(0.2)


async def test_a_database_outage_is_a_503_with_retry_after_and_recovers_by_itself(
        aiohttp_client: Any, make_config: Any, postgres_server: PostgresServer, database_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.storage")
    client = await aiohttp_client(create_app(make_config(storage__backend="postgres")))
    assert (await check(client, encode(photo(seed=4))))[0] == 200
    response = await client.post("/cases/next-id", headers=HEADERS)
    assert (response.status, await response.json()) == (200, {"case_id": "10001"})
    caplog.clear()  # from here on: the outage and the recovery
    postgres_server.stop()
    try:
        for _ in range(3):
            response = await client.post("/cases/next-id", headers=HEADERS)
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            detail = (await response.json())["detail"]
            assert detail == "the database does not answer; try again later"  # where and why: in the log
        status, body = await check(client, encode(photo(seed=5)))
        assert (status, body) == (503, {"detail": "the database does not answer; try again later"})
        ready = await client.get("/ready")
        assert ready.status == 503 and (await ready.json())["checks"]["store"] is False
    finally:
        postgres_server.start()
    await ready_again(client)
    response = await client.post("/cases/next-id", headers=HEADERS)
    assert (response.status, await response.json()) == (200, {"case_id": "10002"})  # nothing lost, nothing reissued
    assert client.app[STORE].stats()["images"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "appliance.storage"]
    assert len([m for m in messages if "unavailable" in m]) == 1, messages
    assert len([m for m in messages if "answers again" in m]) == 1, messages
    # Not once per request or probe anywhere else either (the API's error log, /ready, the pool's retries).
    others = [(r.name, r.getMessage()) for r in caplog.records
              if r.name != "appliance.storage" and r.levelno >= logging.WARNING]
    assert others == []


def test_sslmode_in_the_dsn_is_honoured(database_url: str, tmp_path: Path) -> None:
    # The test server has no TLS: a DSN that requires it is refused with libpq's reason, one line.
    with pytest.raises(StoreError, match=r"^cannot open store postgres 127\.0\.0\.1:\d+/t_\d+: .*"
                                         r"server does not support SSL, but SSL was required$"):
        open_store("postgres", tmp_path / "a", database_url=database_url + "?sslmode=require")
    ca = tmp_path / "ca.pem"
    with pytest.raises(StoreError, match="server does not support SSL, but SSL was required$"):
        open_store("postgres", tmp_path / "b", database_url=f"{database_url}?sslmode=verify-full&sslrootcert={ca}")
    store = open_store("postgres", tmp_path / "c", database_url=database_url + "?sslmode=disable")
    try:
        assert next_case_id(store, USER) == "10000"
    finally:
        store.close()


def test_a_store_that_cannot_reach_its_database_does_not_open(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="^cannot open store postgres 127.0.0.1:1/nothing: "):
        open_store("postgres", tmp_path / "a", database_url="postgresql://postgres@127.0.0.1:1/nothing")


def test_an_outage_raises_store_unavailable_and_stats_says_so(
        make_pg: Callable[..., PostgresStore], postgres_server: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresStore, "connect_timeout_s", 1)
    store = make_pg("a")
    save(store, "img-1", "10000")
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailable, match="^the database does not answer; try again later$"):
            store.stats()
        with pytest.raises(StoreUnavailable):
            save(store, "img-2", "10000")
    finally:
        postgres_server.start()
    assert [r["image_id"] for r in store.list_images(USER)] == ["img-1"]
    save(store, "img-2", "10000")
    assert store.stats()["images"] == 2


# -- `appliance sync status` and `sync retry` on the outbox table ------------------------------


def test_sync_status_and_retry_read_the_outbox_table(
        make_config: Any, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = Bucket(Server("s3", tmp_path / "moto"), "nowhere", tmp_path)
    config = make_config(storage__backend="postgres", storage__images="bucket",
                         storage__images_url=bucket.url("images"), **sync_overrides(bucket))
    store = open_store("postgres", config.storage.root, outbox=True)
    assert isinstance(store, PostgresStore)
    try:
        save(store, "img-1", "10000")
        outbox = PgOutbox(store)
        (job,) = outbox.due(1e12, 10)
        outbox.failed(job, "GenericError: 403", now=1000.0, retry_at=1001.0, dead=True)
        assert sync_command(config.storage, config.sync, config.bucket, status=True, once=False) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["backlog"], printed["dead_letters"], printed["last_error"]) == (1, 1, "GenericError: 403")
        assert printed["outbox"].startswith("postgres 127.0.0.1:")
        assert sync_command(config.storage, config.sync, config.bucket, status=False, once=False, retry=True) == 0
        assert capsys.readouterr().out.startswith("1 dead-lettered sync jobs in postgres 127.0.0.1:")
        assert [j.attempts for j in outbox.due(1e12, 10)] == [0]
    finally:
        store.close()


# -- two instances behind a load balancer, through the API ------------------------------------


async def test_a_client_switching_instance_on_every_call_sees_one_system(
        aiohttp_client: Any, make_config: Any, database_url: str, tmp_path: Path) -> None:
    apps = [await aiohttp_client(create_app(make_config(storage__backend="postgres", storage__root=str(tmp_path / n))))
            for n in ("one", "two")]
    turn = iter(range(1000))

    def next_instance() -> Any:
        return apps[next(turn) % 2]

    issued = []
    for _ in range(6):
        response = await next_instance().post("/cases/next-id", headers=HEADERS)
        issued.append((await response.json())["case_id"])
    status, body = await check(next_instance(), encode(photo(seed=6)))
    assert status == 200
    issued.append(body["case_id"])
    assert issued == [str(10000 + i) for i in range(7)]  # no repeat, in order, whichever instance answered
    case_id = body["case_id"]
    response = await next_instance().post("/cases", json={"case_id": case_id, "notes": "from one"}, headers=HEADERS)
    assert (await response.json())["status"] == "ok"
    response = await next_instance().put(f"/cases/{case_id}", json={"status": "Confirmed"}, headers=HEADERS)
    assert (response.status, await response.json()) == (200, {"status": "ok", "case_id": case_id})
    for client in apps:
        [case] = (await (await client.get("/cases", headers=HEADERS)).json())["cases"]
        assert (case["case_id"], case["notes"], case["status"], case["image_ids"]) == (
            case_id, "from one", "Confirmed", [body["image_id"]])
    response = await next_instance().post("/cases/release-id", json={"case_id": case_id}, headers=HEADERS)
    assert await response.json() == {"status": "skipped", "reason": "case_in_use"}
    response = await next_instance().post("/cases/next-id", headers=HEADERS)
    fresh = (await response.json())["case_id"]
    response = await next_instance().post("/cases/release-id", json={"case_id": case_id}, headers=HEADERS)
    assert await response.json() == {"status": "skipped", "reason": "counter_mismatch", "last_case_id": fresh}
    response = await next_instance().post("/cases/release-id", json={"case_id": fresh}, headers=HEADERS)
    assert await response.json() == {"status": "ok", "case_id": fresh}
    response = await next_instance().post("/cases/next-id", headers=HEADERS)
    assert await response.json() == {"case_id": fresh}  # the released id, issued again by the other instance
