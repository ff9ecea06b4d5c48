"""Issue 13, item 6: encryption bound to identity (format v2), v1 still read, `import-legacy --reencrypt`."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest

from appliance.__main__ import main
from appliance.cases import log_case
from appliance.errors import StoreError
from appliance.storage import BACKENDS, open_store
from appliance.storage.crypto import MAGIC_V2, Sealer

from .stores import JPEG, case_record, image_bytes, save
from .test_legacy import KEY, KEY_B64, old_clinic

ALICE, BOB = "alice", "bob"


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA_ENCRYPTION_KEY", "DATA_ENCRYPTION_KEY_FILE", "CREDENTIALS_DIRECTORY", "ENCRYPT_STORAGE"):
        monkeypatch.delenv(name, raising=False)


# The back ends these tests edit on disk (postgres: tests/test_storage_postgres.py edits its tables).
FILE_BACKENDS = sorted(b for b in BACKENDS if b != "postgres")


def two_users(root: Path, backend: str) -> None:
    """One image and one case each for alice and bob, in an encrypted store."""
    store = open_store(backend, root, sealer=Sealer(KEY))
    try:
        for user, seed in ((ALICE, 1), (BOB, 2)):
            save(store, f"img-{user}", "10000", user=user, data=image_bytes(seed=seed))
            log_case(store, user, case_record("10000", user_id=user, notes=f"{user}'s notes"))
    finally:
        store.close()


def image_file(root: Path, backend: str, user: str) -> Path:
    return root / user / f"img-{user}.bin" if backend == "disk" else root / "images" / user / f"img-{user}.bin"


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_an_image_file_moved_to_another_user_does_not_decrypt(tmp_path: Path, backend: str) -> None:
    root = tmp_path / "store"
    two_users(root, backend)
    alice, bob = image_file(root, backend, ALICE), image_file(root, backend, BOB)
    assert bob.read_bytes().startswith(MAGIC_V2)
    # Same image id under bob's name: only the associated data tells the two apart.
    bob.write_bytes(alice.read_bytes())
    store = open_store(backend, root, sealer=Sealer(KEY))
    try:
        with pytest.raises(StoreError, match=f"^storage: the key does not decrypt {bob}: wrong key, damaged data, "
                                             "or moved from another record$"):
            store.read_image(BOB, "img-bob")
        assert store.read_image(ALICE, "img-alice") == image_bytes(seed=1)
    finally:
        store.close()


def test_a_disk_record_moved_to_another_user_stops_the_store_naming_its_line(tmp_path: Path) -> None:
    root = tmp_path / "store"
    two_users(root, "disk")
    alice_lines = (root / ALICE / "metadata.jsonl").read_bytes().splitlines()
    bob_lines = (root / BOB / "metadata.jsonl").read_bytes().splitlines()
    # Alice's case record, with her case id, copied over bob's.
    (root / BOB / "metadata.jsonl").write_bytes(b"\n".join([bob_lines[0], alice_lines[1]]) + b"\n")
    with pytest.raises(StoreError, match=f"^storage: the key does not decrypt {root / BOB / 'metadata.jsonl'}:2: "
                                         "wrong key, damaged data, or moved from another record$"):
        open_store("disk", root, sealer=Sealer(KEY))


def test_a_sqlite_record_moved_to_another_user_does_not_decrypt(tmp_path: Path) -> None:
    root = tmp_path / "store"
    two_users(root, "sqlite")
    with sqlite3.connect(root / "appliance.db") as db:
        (alice_case,) = db.execute("SELECT record FROM cases WHERE user_id = ?", (ALICE,)).fetchone()
        db.execute("UPDATE cases SET record = ? WHERE user_id = ?", (alice_case, BOB))
    db.close()
    store = open_store("sqlite", root, sealer=Sealer(KEY))
    try:
        with pytest.raises(StoreError, match=f"^storage: the key does not decrypt a record in {root / 'appliance.db'}: "
                                             "wrong key, damaged data, or moved from another record$"):
            store.case_record(BOB, "10000")
        assert store.case_record(ALICE, "10000")["notes"] == "alice's notes"  # type: ignore[index]
    finally:
        store.close()


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_a_record_relabelled_as_another_record_is_refused(tmp_path: Path, backend: str) -> None:
    root = tmp_path / "store"
    store = open_store(backend, root, sealer=Sealer(KEY))
    try:
        save(store, "img-1", "10000", user=ALICE)
        save(store, "img-2", "10000", user=ALICE)
    finally:
        store.close()
    # The envelope's id is bound too: naming another image does not decrypt.
    if backend == "disk":
        path = root / ALICE / "metadata.jsonl"
        envelope = json.loads(path.read_bytes().splitlines()[1])
        envelope["id"] = "image-record:img-1"
        path.write_bytes(path.read_bytes().splitlines()[0] + b"\n" + json.dumps(envelope).encode() + b"\n")
        with pytest.raises(StoreError, match="metadata.jsonl:2: wrong key, damaged data, or moved from another record$"):
            open_store(backend, root, sealer=Sealer(KEY))
    else:
        with sqlite3.connect(root / "appliance.db") as db:
            (body,) = db.execute("SELECT record FROM images WHERE image_id = 'img-2'").fetchone()
            envelope = json.loads(body)
            envelope["id"] = "image-record:img-1"
            db.execute("UPDATE images SET record = ? WHERE image_id = 'img-1'", (json.dumps(envelope),))
        db.close()
        store = open_store(backend, root, sealer=Sealer(KEY))
        try:
            with pytest.raises(StoreError, match="moved from another record$"):
                store.image_record(ALICE, "img-1")
        finally:
            store.close()


def test_a_v1_sqlite_record_is_still_read(tmp_path: Path) -> None:
    root = tmp_path / "store"
    two_users(root, "sqlite")
    record = {**case_record("10000", user_id=ALICE), "notes": "written by an older appliance"}
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = bytes(12)
    blob = nonce + AESGCM(KEY).encrypt(nonce, json.dumps(record).encode(), None)
    v1 = json.dumps({"enc": base64.urlsafe_b64encode(blob).decode(), "v": 1})
    with sqlite3.connect(root / "appliance.db") as db:
        db.execute("UPDATE cases SET record = ? WHERE user_id = ?", (v1, ALICE))
    db.close()
    store = open_store("sqlite", root, sealer=Sealer(KEY))
    try:
        assert store.case_record(ALICE, "10000")["notes"] == "written by an older appliance"  # type: ignore[index]
    finally:
        store.close()


def test_import_legacy_reencrypt_rewrites_an_old_tree_in_place_as_v2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The old server's encrypted tree, used as the disk store's root in place: all v1.
    root = tmp_path / "old"
    jpegs = old_clinic(root, KEY)
    key_file = tmp_path / "key"
    key_file.write_text(KEY_B64 + "\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nbackend = "disk"\nroot = "{root}"\nencrypt = true\nkey_file = "{key_file}"\n')
    assert main(["import-legacy", "--config", str(config)]) == 1
    assert capsys.readouterr().err == "appliance: error: appliance import-legacy: give STORAGE_ROOT, --reencrypt, or both\n"

    assert main(["import-legacy", "--reencrypt", "--config", str(config)]) == 0
    # 3 image records + 3 image files + 4 case lines (the old server appended case 10000 of gp01 twice).
    assert capsys.readouterr().out == f"re-encrypted 10 records and image files of {root} in format v2\n"
    for user in ("gp01", "gp02"):
        envelopes = [json.loads(line) for line in (root / user / "metadata.jsonl").read_bytes().splitlines()]
        assert {e["v"] for e in envelopes} == {2}
        assert all(p.read_bytes().startswith(MAGIC_V2) for p in (root / user).glob("*.bin"))
    store = open_store("disk", root, sealer=Sealer(KEY))
    try:
        assert {i: store.read_image(u, i) for u, i in [("gp01", "img-a1"), ("gp01", "img-a2"), ("gp02", "img-b1")]} == jpegs
        assert store.case_record("gp01", "10000")["notes"] == "biopsy"  # type: ignore[index]
        assert store.case_record("gp02", "10000")["reason"] == "not a lesion"  # type: ignore[index]
    finally:
        store.close()


def test_reencrypt_needs_encryption_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nbackend = "disk"\nroot = "{tmp_path / "store"}"\n')
    assert main(["import-legacy", "--reencrypt", "--config", str(config)]) == 1
    assert capsys.readouterr().err == (
        "appliance: error: appliance import-legacy --reencrypt: storage.encrypt (ENCRYPT_STORAGE) is off\n")


def test_plain_stores_are_untouched_by_v2(tmp_path: Path) -> None:
    store = open_store("disk", tmp_path / "store")
    try:
        save(store, "img-1", "10000", user=ALICE)
        assert store.reseal() == 0
        assert (tmp_path / "store" / ALICE / "img-1.jpg").read_bytes() == JPEG
    finally:
        store.close()
