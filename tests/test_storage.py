"""Contract tests run over every storage back end in BACKENDS, plus each one's own layout.

Real parts throughout: real files under tmp_path, a real SQLite database, real
JPEG/PNG/WebP bytes, and for crashes a real process killed with SIGKILL at the
worst moment of a save.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from appliance.cases import list_cases, log_case, next_case_id, release_case_id, update_case
from appliance.errors import StoreError
from appliance.storage import BACKENDS, Store, StoredImage, open_store

USER = "user001"
OTHER = "user002"
Factory = Callable[..., Store]


def image_bytes(fmt: str = "JPEG", *, seed: int = 0) -> bytes:
    """Real encoded image bytes, different for each seed."""
    img = Image.new("RGB", (32, 24), (120 + seed, 80, 60))
    img.putpixel((seed % 32, 3), (255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


JPEG = image_bytes("JPEG")


def image_record(image_id: str, case_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "image_id": image_id,
        "blur_score": 253.17,
        "predictions": [{"label": "nv", "confidence": 0.9}, {"label": "bkl", "confidence": 0.1}],
        "status": "success",
        "created_at": "2026-01-01T10:00:00+00:00",
        "user_id": USER,
        "user_role": "gp",
        **extra,
    }


def case_record(case_id: str, entry_type: str = "case", **extra: Any) -> dict[str, Any]:
    rec = {
        "entry_type": entry_type,
        "case_id": case_id,
        "user_id": USER,
        "user_role": "gp",
        "created_at": "2026-01-01T10:05:00+00:00",
        "status": "rejected" if entry_type == "reject" else "pending",
    }
    rec.update(extra)
    return rec


def save(store: Store, image_id: str, case_id: str, *, user: str = USER, data: bytes = JPEG,
         suffix: str = ".jpg", **extra: Any) -> None:
    store.save_image(user, StoredImage(image_id, data, suffix), image_record(image_id, case_id, user_id=user, **extra))


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def make_store(backend: str, root: Path) -> Iterator[Factory]:
    """`make_store(**options)`: open the back end on `root` (again); every store is closed at teardown."""
    opened: list[Store] = []

    def make(**options: Any) -> Store:
        store = open_store(backend, options.pop("root", root), **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Factory) -> Store:
    return make_store()


def reopen(store: Store, make_store: Factory) -> Store:
    store.close()
    return make_store()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- case ids -------------------------------------------------------------------


def test_first_case_id_is_case_id_start(store: Store) -> None:
    assert next_case_id(store, USER) == "10000"


def test_case_ids_count_up(store: Store) -> None:
    assert [next_case_id(store, USER) for _ in range(3)] == ["10000", "10001", "10002"]


def test_case_id_start_is_configurable(make_store: Factory) -> None:
    assert next_case_id(make_store(case_id_start=500), USER) == "500"


def test_case_id_counters_are_per_user(store: Store) -> None:
    next_case_id(store, USER)
    next_case_id(store, USER)
    assert next_case_id(store, OTHER) == "10000"
    assert next_case_id(store, USER) == "10002"


def test_release_gives_back_the_last_id(store: Store) -> None:
    next_case_id(store, USER)
    assert next_case_id(store, USER) == "10001"
    assert release_case_id(store, USER, "10001") == {"status": "ok", "case_id": "10001"}
    assert next_case_id(store, USER) == "10001"


def test_release_of_an_older_id_is_a_counter_mismatch(store: Store) -> None:
    next_case_id(store, USER)
    next_case_id(store, USER)
    assert release_case_id(store, USER, "10000") == {
        "status": "skipped", "reason": "counter_mismatch", "last_case_id": "10001"}
    assert next_case_id(store, USER) == "10002"


def test_release_of_an_id_with_an_image_is_in_use(store: Store) -> None:
    case_id = next_case_id(store, USER)
    save(store, "img-1", case_id)
    assert release_case_id(store, USER, case_id) == {"status": "skipped", "reason": "case_in_use"}
    assert next_case_id(store, USER) == "10001"


@pytest.mark.parametrize("entry_type", ["case", "uncertain", "reject"])
def test_release_of_an_id_with_a_case_record_is_in_use(store: Store, entry_type: str) -> None:
    case_id = next_case_id(store, USER)
    log_case(store, USER, case_record(case_id, entry_type))
    assert release_case_id(store, USER, case_id) == {"status": "skipped", "reason": "case_in_use"}


def test_release_ignores_other_users_records(store: Store) -> None:
    case_id = next_case_id(store, USER)
    save(store, "img-1", case_id, user=OTHER)
    assert release_case_id(store, USER, case_id)["status"] == "ok"


def test_release_without_a_counter_is_missing_counter(store: Store) -> None:
    assert release_case_id(store, USER, "10000") == {"status": "skipped", "reason": "missing_counter"}


def test_case_ids_and_releases_survive_reopen(store: Store, make_store: Factory) -> None:
    for _ in range(3):
        next_case_id(store, USER)
    release_case_id(store, USER, "10002")
    store = reopen(store, make_store)
    assert next_case_id(store, USER) == "10002"
    assert next_case_id(store, USER) == "10003"


def test_concurrent_allocations_are_all_distinct(store: Store) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def allocate() -> None:
        try:
            barrier.wait()
            mine = [next_case_id(store, USER) for _ in range(25)]
            results.extend(mine)
        except BaseException as e:  # surfaced below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=int) == [str(n) for n in range(10000, 10200)]


# -- images ---------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_image_bytes_come_back_exactly(store: Store, fmt: str, suffix: str) -> None:
    data = image_bytes(fmt, seed=3)
    save(store, "img-1", "10000", data=data, suffix=suffix)
    assert store.read_image(USER, "img-1") == data


def test_unknown_image_reads_as_none(store: Store) -> None:
    save(store, "img-1", "10000")
    assert store.read_image(USER, "img-2") is None
    assert store.read_image(OTHER, "img-1") is None


def test_image_records_are_listed_oldest_first_with_every_key(store: Store) -> None:
    save(store, "img-b", "10000", device="pixel-7")
    save(store, "img-a", "10001")
    save(store, "img-c", "10000")
    records = store.list_images(USER)
    assert [r["image_id"] for r in records] == ["img-b", "img-a", "img-c"]
    assert records[0] == image_record("img-b", "10000", device="pixel-7")
    assert [r["image_id"] for r in store.list_images(USER, "10000")] == ["img-b", "img-c"]
    assert store.list_images(OTHER) == []


def test_saving_an_image_id_twice_fails_and_keeps_the_first(store: Store) -> None:
    save(store, "img-1", "10000", data=image_bytes(seed=1))
    with pytest.raises(StoreError):
        save(store, "img-1", "10001", data=image_bytes(seed=2))
    assert store.read_image(USER, "img-1") == image_bytes(seed=1)
    assert [r["case_id"] for r in store.list_images(USER)] == ["10000"]


def test_images_survive_reopen(store: Store, make_store: Factory) -> None:
    save(store, "img-1", "10000")
    store = reopen(store, make_store)
    assert store.read_image(USER, "img-1") == JPEG
    assert [r["image_id"] for r in store.list_images(USER)] == ["img-1"]


# -- case records ---------------------------------------------------------------


def test_log_case_returns_the_stored_record_with_image_ids_and_unknown_keys(store: Store) -> None:
    save(store, "img-1", "10000")
    save(store, "img-x", "10001")
    save(store, "img-2", "10000")
    decisions = [{"image_id": "img-1", "decision": "keep"}]
    stored = log_case(store, USER, case_record("10000", status="Confirmed", image_decisions=decisions))
    assert stored == case_record("10000", status="Confirmed", image_decisions=decisions, image_ids=["img-1", "img-2"])
    assert list_cases(store, USER, status=None, limit=10, include_uncertain=True, include_rejected=True) == [stored]


def test_log_case_upserts_by_user_and_case_id(store: Store) -> None:
    log_case(store, USER, case_record("10000", status="pending"))
    log_case(store, USER, case_record("10001"))
    log_case(store, OTHER, case_record("10000", user_id=OTHER))
    log_case(store, USER, case_record("10000", "uncertain"))
    log_case(store, USER, case_record("10000", "reject", reason="blurry"))
    mine = list_cases(store, USER, status=None, limit=10, include_uncertain=True, include_rejected=True)
    assert [(r["case_id"], r["entry_type"]) for r in mine] == [("10000", "reject"), ("10001", "case")]
    assert mine[0]["reason"] == "blurry"
    theirs = list_cases(store, OTHER, status=None, limit=10, include_uncertain=True, include_rejected=True)
    assert [(r["case_id"], r["entry_type"]) for r in theirs] == [("10000", "case")]
    assert store.stats()["cases"] == 3


def test_logged_case_fields_are_taken_over_by_its_images(store: Store) -> None:
    save(store, "img-1", "10000")
    save(store, "img-2", "10001")
    log_case(store, USER, case_record("10000", status="Confirmed", gender="female", age="42", location="back",
                                     symptoms=["itch"], notes="follow up"))
    first, other = store.list_images(USER)
    assert first == image_record(
        "img-1", "10000", case_status="Confirmed", case_entry_type="case",
        case_updated_at="2026-01-01T10:05:00+00:00", gender="female", age="42", location="back",
        symptoms=["itch"], notes="follow up")
    assert other == image_record("img-2", "10001")


def test_empty_case_fields_do_not_overwrite_image_fields(store: Store) -> None:
    save(store, "img-1", "10000")
    log_case(store, USER, case_record("10000", gender="male", age="50", symptoms=["bleeding"], notes="n1"))
    log_case(store, USER, case_record("10000", "uncertain", status="unsure", gender="", age=None, symptoms=[],
                                     notes="n2", updated_at="2026-01-02T09:00:00+00:00"))
    (rec,) = store.list_images(USER)
    assert (rec["gender"], rec["age"], rec["symptoms"], rec["notes"]) == ("male", "50", ["bleeding"], "n2")
    assert (rec["case_status"], rec["case_entry_type"], rec["case_updated_at"]) == (
        "unsure", "uncertain", "2026-01-02T09:00:00+00:00")
    assert "location" not in rec


def test_case_id_is_stored_as_a_string(store: Store) -> None:
    stored = log_case(store, USER, case_record(10000))  # type: ignore[arg-type]
    assert stored["case_id"] == "10000"


def test_log_case_needs_a_case_entry_type(store: Store) -> None:
    with pytest.raises(ValueError):
        log_case(store, USER, case_record("10000", entry_type="image"))


def test_update_case_merges_persists_and_propagates(store: Store, make_store: Factory) -> None:
    save(store, "img-1", "10000")
    log_case(store, USER, case_record("10000", status="pending", notes="first", extra_key=1))
    save(store, "img-2", "10000")
    updated = update_case(store, USER, "10000", {"status": "Confirmed", "age": "61",
                                                "updated_at": "2026-01-03T08:00:00+00:00"})
    assert updated == case_record("10000", status="Confirmed", notes="first", extra_key=1, age="61",
                                  updated_at="2026-01-03T08:00:00+00:00", image_ids=["img-1", "img-2"])
    store = reopen(store, make_store)
    assert list_cases(store, USER, status=None, limit=5, include_uncertain=True, include_rejected=True) == [updated]
    for rec in store.list_images(USER):
        assert (rec["case_status"], rec["case_updated_at"], rec["age"], rec["notes"]) == (
            "Confirmed", "2026-01-03T08:00:00+00:00", "61", "first")


def test_update_case_never_moves_a_record_to_another_case(store: Store) -> None:
    log_case(store, USER, case_record("10000"))
    updated = update_case(store, USER, "10000", {"case_id": "99999", "entry_type": "reject", "user_id": OTHER,
                                                "notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"})
    assert updated is not None
    assert (updated["case_id"], updated["entry_type"], updated["user_id"], updated["notes"]) == (
        "10000", "case", USER, "x")


def test_update_case_updates_an_uncertain_record(store: Store) -> None:
    log_case(store, USER, case_record("10000", "uncertain"))
    updated = update_case(store, USER, "10000", {"notes": "seen", "updated_at": "2026-01-03T08:00:00+00:00"})
    assert updated is not None and updated["entry_type"] == "uncertain" and updated["notes"] == "seen"


def test_update_case_never_updates_a_reject(store: Store) -> None:
    log_case(store, USER, case_record("10000", "reject"))
    assert update_case(store, USER, "10000", {"notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"}) is None
    (rec,) = list_cases(store, USER, status=None, limit=5, include_uncertain=True, include_rejected=True)
    assert "notes" not in rec


def test_update_case_of_an_unknown_case_is_none(store: Store) -> None:
    log_case(store, OTHER, case_record("10000", user_id=OTHER))
    assert update_case(store, USER, "10000", {"notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"}) is None
    assert update_case(store, USER, "10001", {"notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"}) is None


def listed(store: Store, user: str | None = USER, **options: Any) -> list[tuple[str, str]]:
    defaults: dict[str, Any] = {"status": None, "limit": 100, "include_uncertain": True, "include_rejected": True}
    records = list_cases(store, user, **{**defaults, **options})
    return [(r["case_id"], r["entry_type"]) for r in records]


@pytest.fixture
def cases(store: Store) -> Store:
    """A store with images and case records of two users at distinct and equal times."""
    save(store, "img-1", "10000")
    log_case(store, USER, case_record("10000", status="Confirmed", created_at="2026-01-01T09:00:00+00:00"))
    log_case(store, USER, case_record("10001", "uncertain", created_at="2026-01-03T09:00:00+00:00"))
    log_case(store, USER, case_record("10002", "reject", created_at="2026-01-02T09:00:00+00:00"))
    log_case(store, USER, case_record("10003", status="pending", created_at="2026-01-02T09:00:00+00:00"))
    log_case(store, OTHER, case_record("10000", user_id=OTHER, created_at="2026-01-04T09:00:00+00:00"))
    return store


def test_list_cases_is_newest_first_latest_written_first_on_ties(cases: Store) -> None:
    assert listed(cases) == [("10001", "uncertain"), ("10003", "case"), ("10002", "reject"), ("10000", "case")]


def test_list_cases_of_everyone_for_an_admin(cases: Store) -> None:
    assert listed(cases, None)[:2] == [("10000", "case"), ("10001", "uncertain")]
    assert len(listed(cases, None)) == 5


def test_list_cases_filters_by_entry_type(cases: Store) -> None:
    assert listed(cases, include_uncertain=False) == [("10003", "case"), ("10002", "reject"), ("10000", "case")]
    assert listed(cases, include_rejected=False) == [("10001", "uncertain"), ("10003", "case"), ("10000", "case")]
    assert listed(cases, include_uncertain=False, include_rejected=False) == [("10003", "case"), ("10000", "case")]


def test_list_cases_matches_status_case_insensitively(cases: Store) -> None:
    assert listed(cases, status="confirmed") == [("10000", "case")]
    assert listed(cases, status="PENDING") == [("10001", "uncertain"), ("10003", "case")]
    assert listed(cases, status="Rejected") == [("10002", "reject")]
    assert listed(cases, status="nothing") == []


def test_list_cases_stops_at_the_limit(cases: Store) -> None:
    assert listed(cases, limit=2) == [("10001", "uncertain"), ("10003", "case")]
    assert listed(cases, limit=0) == []


def test_list_cases_never_lists_image_records(store: Store) -> None:
    save(store, "img-1", "10000")
    assert listed(store) == []
    assert listed(store, None) == []


# -- input checks ---------------------------------------------------------------

BAD_IDS = ["", "../etc", "a/b", "a.b", ".hidden", "x" * 129, "abc\n", "é", "a b", None]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_user_ids_are_refused(store: Store, root: Path, bad: Any) -> None:
    with pytest.raises(ValueError):
        next_case_id(store, bad)
    with pytest.raises(ValueError):
        save(store, "img-1", "10000", user=bad)
    with pytest.raises(ValueError):
        log_case(store, bad, case_record("10000"))
    with pytest.raises(ValueError):
        store.read_image(bad, "img-1")
    with pytest.raises(ValueError):
        store.list_images(bad)
    assert not (root.parent / "etc").exists()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_image_ids_are_refused(store: Store, root: Path, bad: Any) -> None:
    with pytest.raises(ValueError):
        store.save_image(USER, StoredImage(bad, JPEG, ".jpg"), image_record("img-1", "10000"))
    with pytest.raises(ValueError):
        store.read_image(USER, bad)
    assert store.list_images(USER) == []
    assert not (root.parent / "etc.jpg").exists()


@pytest.mark.parametrize("bad", [".gif", ".JPG", "jpg", "", "/x.jpg", None])
def test_bad_suffixes_are_refused(store: Store, bad: Any) -> None:
    with pytest.raises(ValueError):
        store.save_image(USER, StoredImage("img-1", JPEG, bad), image_record("img-1", "10000"))
    assert store.list_images(USER) == []


def test_a_record_for_another_image_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.save_image(USER, StoredImage("img-1", JPEG, ".jpg"), image_record("img-2", "10000"))


def test_a_file_where_the_root_should_be_is_a_store_error(backend: str, tmp_path: Path) -> None:
    (tmp_path / "store").write_text("not a directory")
    with pytest.raises(StoreError, match=str(tmp_path / "store")):
        open_store(backend, tmp_path / "store")


def test_a_root_under_a_file_is_a_store_error(backend: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=str(tmp_path / "file" / "store")):
        open_store(backend, tmp_path / "file" / "store")


def test_a_root_in_use_by_another_store_is_a_store_error(store: Store, backend: str, root: Path) -> None:
    with pytest.raises(StoreError, match="in use"):
        open_store(backend, root)


def test_a_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError):
        next_case_id(store, USER)


# -- stats ----------------------------------------------------------------------


def test_stats_count_records_and_image_bytes(store: Store, make_store: Factory, backend: str, root: Path) -> None:
    assert store.stats() == {**store.stats(), "backend": backend, "root": str(root), "images": 0, "cases": 0,
                             "image_bytes": 0}
    png = image_bytes("PNG")
    save(store, "img-1", "10000")
    save(store, "img-2", "10000", data=png, suffix=".png")
    log_case(store, USER, case_record("10000"))
    log_case(store, USER, case_record("10000", "reject"))
    log_case(store, OTHER, case_record("10000"))
    expected = {"images": 2, "cases": 2, "image_bytes": len(JPEG) + len(png)}
    assert {k: store.stats()[k] for k in expected} == expected
    store = reopen(store, make_store)
    assert {k: store.stats()[k] for k in expected} == expected


# -- failures and crashes -------------------------------------------------------


def test_a_failing_record_write_leaves_neither_file_nor_record(
        store: Store, make_store: Factory, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    before = files_under(root)
    monkeypatch.setattr(store, "_commit_image_record", fail)
    with pytest.raises(StoreError, match="No space left"):
        save(store, "img-1", "10000")
    assert store.read_image(USER, "img-1") is None
    assert store.list_images(USER) == []
    assert [f for f in files_under(root) if f not in before] == []
    assert store.stats()["images"] == 0
    monkeypatch.undo()
    save(store, "img-1", "10000")  # the failed save left nothing in the way
    store = reopen(store, make_store)
    assert store.read_image(USER, "img-1") == JPEG


def test_a_failing_file_write_leaves_no_temp_file(
        store: Store, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    save(store, "img-0", "10000")
    before = files_under(root)
    monkeypatch.setattr(os, "replace", fail)  # what files.write_atomic renames with
    with pytest.raises(StoreError, match="Input/output error"):
        save(store, "img-1", "10000")
    monkeypatch.undo()
    assert files_under(root) == before
    assert [r["image_id"] for r in store.list_images(USER)] == ["img-0"]


CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
from appliance.storage import StoredImage, open_store

backend, root, point, image_path = sys.argv[1:5]
store = open_store(backend, Path(root))

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before-record":     # the image file has landed, its record not yet
    store._commit_image_record = die
elif point == "before-rename":   # the temp file is written and fsync'd, not yet renamed
    os.replace = die
record = {"case_id": "10000", "image_id": "img-crash", "status": "success",
          "created_at": "2026-01-01T10:00:00+00:00", "user_id": "user001", "user_role": "gp"}
store.save_image("user001", StoredImage("img-crash", Path(image_path).read_bytes(), ".jpg"), record)
die()                            # "after-return": killed right after save_image returned
"""


def crash_mid_save(backend: str, root: Path, point: str, tmp_path: Path) -> None:
    """Save one image in a subprocess that SIGKILLs itself at `point`."""
    image_path = tmp_path / "crash.jpg"
    image_path.write_bytes(JPEG)
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, backend, str(root), point, str(image_path)],
                          capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


@pytest.mark.parametrize("point", ["before-record", "before-rename"])
def test_a_crash_mid_save_leaves_nothing_after_reopen(
        make_store: Factory, backend: str, root: Path, tmp_path: Path, point: str) -> None:
    store = make_store()
    save(store, "img-0", "10000")
    store.close()
    crash_mid_save(backend, root, point, tmp_path)
    assert any("img-crash" in f for f in files_under(root))  # the crash left a file (or temp file) behind
    store = make_store()
    assert store.read_image(USER, "img-crash") is None
    assert [r["image_id"] for r in store.list_images(USER)] == ["img-0"]
    assert [f for f in files_under(root) if "img-crash" in f or f.endswith(".tmp")] == []
    assert store.stats()["images"] == 1
    save(store, "img-crash", "10000")
    assert store.read_image(USER, "img-crash") == JPEG


def test_a_crash_right_after_a_save_keeps_both(make_store: Factory, backend: str, root: Path, tmp_path: Path) -> None:
    make_store().close()
    crash_mid_save(backend, root, "after-return", tmp_path)
    store = make_store()
    assert store.read_image(USER, "img-crash") == JPEG
    assert [r["image_id"] for r in store.list_images(USER)] == ["img-crash"]


# -- the disk layout ------------------------------------------------------------


@pytest.fixture
def disk_store(root: Path) -> Iterator[Store]:
    store = open_store("disk", root)
    yield store
    store.close()


def metadata_lines(root: Path, user: str = USER) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / user / "metadata.jsonl").read_text().splitlines()]


def test_disk_writes_the_old_servers_layout(disk_store: Store, root: Path) -> None:
    for _ in range(3):
        next_case_id(disk_store, USER)
    save(disk_store, "img-1", "10000")
    save(disk_store, "img-2", "10001", data=image_bytes("PNG"), suffix=".png")
    log_case(disk_store, USER, case_record("10000"))
    assert json.loads((root / USER / "case_counter.json").read_text()) == {"last_case_id": 10002}
    assert (root / USER / "img-1.jpg").read_bytes() == JPEG
    assert (root / USER / "img-2.png").read_bytes() == image_bytes("PNG")
    lines = metadata_lines(root)
    assert ["entry_type" in line for line in lines] == [False, False, True]
    assert lines[2]["image_ids"] == ["img-1"]
    assert sorted(p.name for p in root.iterdir()) == [".lock", USER]


def test_disk_cuts_a_torn_last_line_and_removes_its_orphan_image(disk_store: Store, root: Path) -> None:
    save(disk_store, "img-1", "10000")
    log_case(disk_store, USER, case_record("10000"))
    disk_store.close()
    # What a crash mid-append leaves: the image file landed, its line half-written.
    (root / USER / "img-2.jpg").write_bytes(JPEG)
    intact = (root / USER / "metadata.jsonl").read_bytes()
    with open(root / USER / "metadata.jsonl", "ab") as f:
        f.write(b'{"case_id": "10000", "image_id": "img-2", "blur')
    store = open_store("disk", root)
    try:
        assert (root / USER / "metadata.jsonl").read_bytes() == intact
        assert not (root / USER / "img-2.jpg").exists()
        assert [r["image_id"] for r in store.list_images(USER)] == ["img-1"]
        save(store, "img-3", "10000")
        assert [r.get("image_id") for r in metadata_lines(root)] == ["img-1", None, "img-3"]
    finally:
        store.close()


def test_disk_ignores_a_torn_last_line_on_read(disk_store: Store, root: Path) -> None:
    save(disk_store, "img-1", "10000")
    with open(root / USER / "metadata.jsonl", "ab") as f:
        f.write(b'{"entry_type": "case", "case_id": "10000", "crea')
    assert [r["image_id"] for r in disk_store.list_images(USER)] == ["img-1"]
    assert listed(disk_store) == []
    save(disk_store, "img-2", "10000")  # appends after cutting the torn tail
    assert [r["image_id"] for r in metadata_lines(root)] == ["img-1", "img-2"]


def test_disk_keeps_lines_it_cannot_read_and_their_images(root: Path) -> None:
    user_dir = root / USER
    user_dir.mkdir(parents=True)
    damaged = b'{"image_id": "old-image", "case_id": "1\x00\x00\x00'  # a whole line, but not JSON
    (user_dir / "metadata.jsonl").write_bytes(damaged + b"\n")
    (user_dir / "old-image.jpg").write_bytes(JPEG)
    store = open_store("disk", root)
    try:
        assert (user_dir / "old-image.jpg").exists()
        log_case(store, USER, case_record("10000"))
        assert (user_dir / "metadata.jsonl").read_bytes().splitlines()[0] == damaged
        assert store.list_images(USER) == []
        assert listed(store) == [("10000", "case")]
    finally:
        store.close()


def test_disk_refuses_an_unreadable_counter(disk_store: Store, root: Path) -> None:
    (root / USER).mkdir()
    (root / USER / "case_counter.json").write_text("{\"last")
    with pytest.raises(StoreError, match="case_counter.json"):
        next_case_id(disk_store, USER)


def test_disk_reads_a_counter_written_by_the_old_server(disk_store: Store, root: Path) -> None:
    (root / USER).mkdir()
    (root / USER / "case_counter.json").write_text('{"last_case_id": 10041}')
    assert next_case_id(disk_store, USER) == "10042"


# -- the sqlite layout ----------------------------------------------------------


@pytest.fixture
def sqlite_store(root: Path) -> Iterator[Store]:
    store = open_store("sqlite", root)
    yield store
    store.close()


def test_sqlite_keeps_images_as_files_and_records_in_a_wal_database(sqlite_store: Store, root: Path) -> None:
    save(sqlite_store, "img-1", "10000", data=image_bytes("WEBP"), suffix=".webp")
    assert (root / "images" / USER / "img-1.webp").read_bytes() == image_bytes("WEBP")
    with sqlite3.connect(root / "appliance.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert [v for (v,) in conn.execute("SELECT version FROM schema_migrations")] == [1, 2]
        assert conn.execute("SELECT count(*) FROM pending_files").fetchone() == (0,)
        assert conn.execute("SELECT image_id, size_bytes FROM images").fetchall() == [
            ("img-1", len(image_bytes("WEBP")))]
    conn.close()


def test_sqlite_refuses_a_database_from_a_newer_appliance(sqlite_store: Store, root: Path) -> None:
    sqlite_store.close()
    conn = sqlite3.connect(root / "appliance.db")
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, '2030-01-01')")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store("sqlite", root)


def test_sqlite_refuses_a_file_that_is_not_a_database(root: Path) -> None:
    root.mkdir()
    (root / "appliance.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="appliance.db"):
        open_store("sqlite", root)


def test_sqlite_migrations_run_once(sqlite_store: Store, root: Path) -> None:
    next_case_id(sqlite_store, USER)
    sqlite_store.close()
    store = open_store("sqlite", root)
    try:
        assert next_case_id(store, USER) == "10001"
    finally:
        store.close()
    with sqlite3.connect(root / "appliance.db") as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (2,)
    conn.close()
