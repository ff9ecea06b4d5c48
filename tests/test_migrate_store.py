"""`appliance migrate-store`: the configured store copied into another back end, idempotently and resumably.

Real stores on real files: every source back end into every registered target
(a new back end is a target by its registry line), run twice, interrupted and
resumed; then compared record for record, byte for byte, counter for counter.
`appliance import-legacy` is checked to write into whichever store the config names.
"""

from __future__ import annotations

import base64
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.__main__ import main
from appliance.cases import list_cases, log_case, next_case_id, raise_case_counter, update_case
from appliance.storage import BACKENDS, Store, StoredImage, open_store
from appliance.storage.crypto import Sealer
from appliance.storage.migrate import migrate

from .stores import image_bytes, image_record
from .test_legacy import old_clinic

SOURCES = ("sqlite", "disk")
KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
ROOT = Path(__file__).resolve().parent.parent


def fill(store: Store) -> None:
    """Three users' worth of data through the Store API, with ties in created_at and updated cases."""
    u1, u2, u3 = "user001", "user002", "user003"
    for n, (image_id, case_id, fmt) in enumerate(
            [("img-1", "10000", "JPEG"), ("img-2", "10000", "PNG"), ("img-3", "10001", "WEBP")]):
        suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
        store.save_image(u1, StoredImage(image_id, image_bytes(fmt, seed=n), suffix),
                         image_record(image_id, case_id, user_id=u1, created_at=f"2026-01-01T10:0{n}:00+00:00"))
    for _ in range(3):
        next_case_id(store, u1)  # 10000..10002
    log_case(store, u1, {"entry_type": "case", "case_id": "10000", "user_id": u1, "status": "pending",
                         "created_at": "2026-01-01T11:00:00+00:00", "age": "40-49"})
    log_case(store, u1, {"entry_type": "reject", "case_id": "10001", "user_id": u1, "status": "rejected",
                         "created_at": "2026-01-01T11:00:00+00:00"})  # same created_at: write order breaks the tie
    log_case(store, u1, {"entry_type": "uncertain", "case_id": "10002", "user_id": u1, "status": "pending",
                         "created_at": "2026-01-01T09:00:00+00:00"})
    update_case(store, u1, "10000", {"status": "confirmed", "notes": "biopsy"})
    store.save_image(u2, StoredImage("img-9", image_bytes("JPEG", seed=9), ".jpg"),
                     image_record("img-9", None, user_id=u2))  # an image of no case
    raise_case_counter(store, u3, 10041)  # a counter and nothing else


def snapshot(store: Store) -> dict[str, Any]:
    """Everything a store holds, as the API would show it: records in order, image bytes, counters."""
    users: dict[str, Any] = {}
    for user_id in store.users():
        images = store.list_images(user_id)
        with store.reading(user_id, "test") as records:
            counter = records.counter()
        users[user_id] = {
            "images": images,
            "bytes": {rec["image_id"]: store.read_image(user_id, rec["image_id"]) for rec in images},
            "cases": list_cases(store, user_id, status=None, limit=None, include_uncertain=True,
                                include_rejected=True),
            "counter": counter,
        }
    return users


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=sorted(BACKENDS))
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def config_file(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nbackend = "{source}"\nroot = "{tmp_path / "from"}"\n')
    return path


@pytest.fixture
def filled(tmp_path: Path, source: str) -> dict[str, Any]:
    """The source store filled and closed again (migrate-store locks it); its snapshot."""
    with opened(source, tmp_path / "from") as store:
        fill(store)
        return snapshot(store)


@contextlib.contextmanager
def opened(backend: str, root: Path, **options: Any) -> Iterator[Store]:
    store = open_store(backend, root, **options)
    try:
        yield store
    finally:
        store.close()


def test_copies_everything_once(tmp_path: Path, source: str, target: str, config_file: Path,
                                filled: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["migrate-store", "--to", target, "--to-root", str(tmp_path / "to"), "--config", str(config_file)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (f"copied {source} store {tmp_path / 'from'} into {target} store {tmp_path / 'to'}: users 3; "
                   "9 copied, 0 already there; images 4 copied, 0 already there; case records 3 copied, "
                   "0 already there; counters 2 raised, 0 already as high; 0 not copied\n")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith(": users 3; 0 copied, 9 already there; images 0 copied, 4 already there; case records "
                        "0 copied, 3 already there; counters 0 raised, 2 already as high; 0 not copied\n")
    with opened(target, tmp_path / "to") as copy:
        assert snapshot(copy) == filled


class Interrupting:
    """A target that stops the copy (as Ctrl-C would) at the `at`-th call of `method`; else the store itself."""

    def __init__(self, store: Store, method: str, at: int) -> None:
        self._store, self._method, self._left = store, method, at

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name != self._method:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._left -= 1
            if self._left == 0:
                raise KeyboardInterrupt
            return attr(*args, **kwargs)

        return call


@pytest.mark.parametrize(("method", "at", "images_done", "cases_done"), [
    ("save_image", 3, 2, 0),  # in the middle of user001's images
    ("writing", 2, 3, 1),  # after user001's images and its first case record, at its second
])
def test_an_interrupted_copy_resumes(tmp_path: Path, source: str, config_file: Path, filled: dict[str, Any],
                                     capsys: pytest.CaptureFixture[str], method: str, at: int, images_done: int,
                                     cases_done: int) -> None:
    target = "disk" if source == "sqlite" else "sqlite"
    with opened(source, tmp_path / "from") as from_store, opened(target, tmp_path / "to") as to_store:
        with pytest.raises(KeyboardInterrupt):
            migrate(from_store, Interrupting(to_store, method, at))  # type: ignore[arg-type]
    args = ["migrate-store", "--to", target, "--to-root", str(tmp_path / "to"), "--config", str(config_file)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (f"images {4 - images_done} copied, {images_done} already there; "
            f"case records {3 - cases_done} copied, {cases_done} already there; counters 2 raised") in out
    assert main(args) == 0
    assert ": users 3; 0 copied, 9 already there;" in capsys.readouterr().out
    with opened(target, tmp_path / "to") as copy:
        assert snapshot(copy) == filled


def test_counters_are_never_lowered_and_a_case_the_target_holds_is_never_overwritten(
        tmp_path: Path, source: str, config_file: Path, filled: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    target = "disk" if source == "sqlite" else "sqlite"
    edited = {"entry_type": "case", "case_id": "10002", "user_id": "user001", "status": "other",
              "created_at": "2026-01-02T00:00:00+00:00"}
    with opened(target, tmp_path / "to") as to_store:
        raise_case_counter(to_store, "user003", 10050)  # the target issued more ids already
        log_case(to_store, "user001", edited)  # an edit made on the target (or another box's case 10002)
    args = ["migrate-store", "--to", target, "--to-root", str(tmp_path / "to"), "--config", str(config_file)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err == ("appliance: cannot copy user user001 case 10002: the target already holds a different "
                            "record of this case; kept the target's\n")
    assert captured.out.endswith(
        ": users 3; 7 copied, 1 already there; images 4 copied, 0 already there; case records 2 copied, "
        "0 already there; counters 1 raised, 1 already as high; 1 not copied\n")
    with opened(target, tmp_path / "to") as copy:
        got = snapshot(copy)
        [kept] = [r for r in list_cases(copy, "user001", status=None, limit=None, include_uncertain=True,
                                        include_rejected=True) if r["case_id"] == "10002"]
    assert got["user003"]["counter"] == 10050
    assert (kept["entry_type"], kept["status"]) == ("case", "other")  # the target's edit survives a second run
    assert main(args) == 1  # and a third
    assert "case records 0 copied, 2 already there" in capsys.readouterr().out


def test_an_encrypted_store_is_copied_encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "store.key"
    key_file.write_text(KEY + "\n")
    for name in ("DATA_ENCRYPTION_KEY", "DATA_ENCRYPTION_KEY_FILE", "CREDENTIALS_DIRECTORY", "ENCRYPT_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    sealer = Sealer(base64.urlsafe_b64decode(KEY), str(key_file))
    with opened("sqlite", tmp_path / "from", sealer=sealer) as store:
        fill(store)
        before = snapshot(store)
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nroot = "{tmp_path / "from"}"\nencrypt = true\n'
                      f'key_file = "{key_file}"\n')
    assert main(["migrate-store", "--to", "disk", "--to-root", str(tmp_path / "to"), "--config", str(config)]) == 0
    assert "images 4 copied" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "to" / "user001").iterdir() if p.name.startswith("img")) == [
        "img-1.bin", "img-2.bin", "img-3.bin"]
    with opened("disk", tmp_path / "to", sealer=sealer) as copy:
        assert snapshot(copy) == before


def test_one_line_errors_name_the_option(tmp_path: Path, source: str, config_file: Path, filled: dict[str, Any],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = ["migrate-store", "--config", str(config_file)]
    assert main([*base, "--to", source]) == 1
    assert capsys.readouterr().err == (f"appliance: error: --to, --to-root: that is the configured store itself "
                                       f"({source} at {tmp_path / 'from'}); name another back end or root\n")
    other = "disk" if source == "sqlite" else "sqlite"
    assert main([*base, "--to", other]) == 1  # the same root: the source holds its lock
    assert capsys.readouterr().err == (
        f"appliance: error: --to {other}, --to-root {tmp_path / 'from'}: storage root {tmp_path / 'from'} is in use "
        f"by another process (lock {tmp_path / 'from' / '.lock'})\n")
    assert main([*base, "--to", other, "--to-root", str(tmp_path / "to"), "--images-to-bucket"]) == 1
    assert capsys.readouterr().err == (
        f"appliance: error: --images-to-bucket: the {other} back end keeps its images beside its records; only one "
        "keeping them apart (postgres) puts them at storage.images_url\n")
    with pytest.raises(SystemExit) as caught:
        main([*base, "--to", "postgress"])
    assert caught.value.code == 2
    choices = ", ".join(repr(name) for name in sorted(BACKENDS))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"appliance migrate-store: error: argument --to: invalid choice: 'postgress' (choose from {choices})")
    assert not (tmp_path / "to").exists()


def test_the_command_runs_as_a_process(tmp_path: Path, filled: dict[str, Any], config_file: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "appliance", "migrate-store", "--to", "disk", "--to-root",
                           str(tmp_path / "to"), "--config", str(config_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert "images 4 copied, 0 already there" in done.stdout


@pytest.mark.parametrize("backend", SOURCES)
def test_import_legacy_writes_into_the_configured_store(tmp_path: Path, backend: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    jpegs = old_clinic(tmp_path / "old")
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nbackend = "{backend}"\nroot = "{tmp_path / "new"}"\n')
    assert main(["import-legacy", str(tmp_path / "old"), "--config", str(config)]) == 0
    assert f"into {backend} store {tmp_path / 'new'}: users 2; images 3 imported" in capsys.readouterr().out
    with opened(backend, tmp_path / "new") as store:
        assert store.users() == ["gp01", "gp02"]
        assert {rec["image_id"] for user in store.users() for rec in store.list_images(user)} == set(jpegs)
    # ...and from there into the other back end, whole.
    other = "disk" if backend == "sqlite" else "sqlite"
    assert main(["migrate-store", "--to", other, "--to-root", str(tmp_path / "moved"), "--config", str(config)]) == 0
    assert ": users 2; 8 copied, 0 already there; images 3 copied" in capsys.readouterr().out
    with opened(backend, tmp_path / "new") as store, opened(other, tmp_path / "moved") as moved:
        assert snapshot(moved) == snapshot(store)


def test_images_to_bucket_needs_storage_images_url(tmp_path: Path, source: str, config_file: Path,
                                                   filled: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["migrate-store", "--config", str(config_file), "--to", "postgres", "--to-root", str(tmp_path / "to"),
            "--images-to-bucket"]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        "appliance: error: --images-to-bucket: storage.images_url: expected a bucket URL (s3://, gs://, az:// or "
        'https://) when storage.images = "bucket"\n')
    assert not (tmp_path / "to").exists()
