"""Store contract tests run over every storage back end in BACKENDS: images, input checks, stats, crashes.

Real parts throughout: real files under tmp_path, a real SQLite database, real
JPEG/PNG/WebP bytes, and for crashes a real process killed with SIGKILL at the
worst moment of a save. Each back end's own layout is tested in
test_storage_<backend>.py; the case rules over the stores in test_cases.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.cases import log_case, next_case_id
from appliance.errors import StoreError
from appliance.storage import Store, StoredImage, open_store

from . import stores
from .stores import (
    JPEG,
    OTHER,
    USER,
    Factory,
    case_record,
    files_under,
    image_bytes,
    image_record,
    reopen,
    save,
)

# The store fixtures, parametrized over storage.BACKENDS (tests/stores.py).
backend, root, make_store, store = stores.backend, stores.root, stores.make_store, stores.store


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
