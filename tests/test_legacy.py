"""`appliance import-legacy`: an old server's storage tree, plain and encrypted, into both stores."""

from __future__ import annotations

import base64
import io
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from PIL import Image

from appliance.__main__ import main
from appliance.cases import list_cases, next_case_id
from appliance.errors import StoreError
from appliance.legacy import import_legacy
from appliance.storage import BACKENDS, Store, open_store
from appliance.storage.crypto import Sealer

from .conftest import encode, photo

KEY = bytes(range(32))
KEY_B64 = base64.urlsafe_b64encode(KEY).decode()


class OldServer:
    """Writes storage exactly as the old back end did: q90 JPEGs, metadata.jsonl lines, case_counter.json."""

    def __init__(self, root: Path, key: bytes | None = None) -> None:
        self.root = root
        self.aead = None if key is None else AESGCM(key)

    def _seal(self, data: bytes) -> bytes:
        assert self.aead is not None
        nonce = secrets.token_bytes(12)
        return nonce + self.aead.encrypt(nonce, data, None)

    def append(self, user_id: str, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        if self.aead is not None:
            line = json.dumps({"enc": base64.urlsafe_b64encode(self._seal(line.encode())).decode(), "v": 1})
        (self.root / user_id).mkdir(parents=True, exist_ok=True)
        with open(self.root / user_id / "metadata.jsonl", "a") as f:
            f.write(line + "\n")

    def save_image(self, user_id: str, image_id: str, case_id: str, upload: bytes, created_at: str) -> bytes:
        """Re-encode at quality 90 as the old server did; return the JPEG it kept."""
        buffer = io.BytesIO()
        Image.open(io.BytesIO(upload)).convert("RGB").save(buffer, "JPEG", quality=90)
        jpeg = buffer.getvalue()
        (self.root / user_id).mkdir(parents=True, exist_ok=True)
        if self.aead is None:
            (self.root / user_id / f"{image_id}.jpg").write_bytes(jpeg)
        else:
            (self.root / user_id / f"{image_id}.bin").write_bytes(self._seal(jpeg))
        self.append(user_id, {
            "case_id": case_id, "image_id": image_id, "blur_score": 812.5,
            "predictions": [{"label": "nv", "confidence": 0.91}, {"label": "mel", "confidence": 0.05}],
            "status": "success", "created_at": created_at, "user_id": user_id, "user_role": "gp",
        })
        return jpeg

    def log(self, user_id: str, entry_type: str, case_id: str, created_at: str, **fields: Any) -> None:
        self.append(user_id, {"case_id": case_id, "entry_type": entry_type, "created_at": created_at,
                              "user_id": user_id, "user_role": "gp", **fields})

    def counter(self, user_id: str, last: int) -> None:
        (self.root / user_id / "case_counter.json").write_text(json.dumps({"last_case_id": last}))


def old_clinic(root: Path, key: bytes | None = None) -> dict[str, bytes]:
    """Two users' worth of old data; returns the JPEG kept for each image id."""
    old = OldServer(root, key)
    jpegs = {
        "img-a1": old.save_image("gp01", "img-a1", "10000", encode(photo(seed=1)), "2025-03-01T09:00:00"),
        "img-a2": old.save_image("gp01", "img-a2", "10000", encode(photo(seed=2), "PNG"), "2025-03-01T09:01:00"),
        "img-b1": old.save_image("gp02", "img-b1", "10000", encode(photo(seed=3)), "2025-03-02T10:00:00"),
    }
    old.log("gp01", "case", "10000", "2025-03-01T09:02:00", status="pending", age="40-49")
    old.log("gp01", "case", "10000", "2025-03-01T09:02:00", status="confirmed", age="40-49", notes="biopsy")
    old.log("gp01", "uncertain", "10001", "2025-03-01T11:00:00", status="pending")
    old.log("gp02", "reject", "10000", "2025-03-02T10:05:00", status="rejected", reason="not a lesion")
    old.counter("gp01", 10001)
    old.counter("gp02", 10000)
    return jpegs


def every_case(store: Store, user_id: str | None = None) -> list[tuple[str, str, str, str]]:
    return [
        (r["user_id"], r["case_id"], r["entry_type"], r["status"])
        for r in list_cases(store, user_id, status=None, limit=100, include_uncertain=True, include_rejected=True)
    ]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_an_old_clinic_imports_whole_and_only_once(tmp_path: Path, backend: str, encrypted: bool) -> None:
    source = tmp_path / "old"
    jpegs = old_clinic(source, KEY if encrypted else None)
    store = open_store(backend, tmp_path / "new")
    try:
        sealer = Sealer(KEY if encrypted else None)
        report = import_legacy(source, store, sealer=sealer)
        assert report.problems == []
        assert (report.users, report.images, report.case_records, report.counters) == (2, 3, 3, 2)
        for user_id, image_id in (("gp01", "img-a1"), ("gp01", "img-a2"), ("gp02", "img-b1")):
            assert store.read_image(user_id, image_id) == jpegs[image_id]
        assert every_case(store) == [
            ("gp02", "10000", "reject", "rejected"),
            ("gp01", "10001", "uncertain", "pending"),
            ("gp01", "10000", "case", "confirmed"),  # the later line of case 10000 won
        ]
        [case] = list_cases(store, "gp01", status="confirmed", limit=5, include_uncertain=False, include_rejected=False)
        assert case["image_ids"] == ["img-a1", "img-a2"] and case["notes"] == "biopsy"
        images = store.list_images("gp01")
        assert [r["image_id"] for r in images] == ["img-a1", "img-a2"]
        assert images[0]["blur_score"] == 812.5 and images[0]["case_status"] == "confirmed"
        assert next_case_id(store, "gp01") == "10002" and next_case_id(store, "gp02") == "10001"
        before = (every_case(store), store.list_images("gp01"), store.list_images("gp02"), store.stats())

        again = import_legacy(source, store, sealer=sealer)
        assert again.problems == []
        assert (again.images, again.case_records, again.counters) == (0, 0, 0)
        assert (again.images_present, again.case_records_present, again.counters_present) == (3, 3, 2)
        assert (every_case(store), store.list_images("gp01"), store.list_images("gp02"), store.stats()) == before
        assert next_case_id(store, "gp01") == "10003"  # the counter was not wound back
    finally:
        store.close()


def test_unreadable_lines_and_files_are_reported_with_path_and_line(tmp_path: Path) -> None:
    source = tmp_path / "old"
    old_clinic(source)
    metadata = source / "gp01" / "metadata.jsonl"
    with open(metadata, "ab") as f:
        f.write(b'{"case_id": "10002", "entry_type": "case", "crea\n')  # line 6: cut short
        f.write(b'["not", "a", "record"]\n')  # line 7
        f.write(b'{"case_id": "10003", "entry_type": "followup"}\n')  # line 8
        f.write(b'{"case_id": "10003", "image_id": "img-gone"}\n')  # line 9: no image file
    (source / "gp01" / "img-stray.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (source / "gp02" / "case_counter.json").write_text('{"last": 3}')
    store = open_store("sqlite", tmp_path / "new")
    try:
        report = import_legacy(source, store, sealer=Sealer(None))
    finally:
        store.close()
    assert report.problems == [
        f"{metadata}:6: not JSON (Unterminated string starting at)",
        f"{metadata}:7: not a JSON object",
        f"{metadata}:8: unknown entry_type 'followup'",
        f"{metadata}:9: image img-gone has no image file; not imported",
        f"{source / 'gp01' / 'img-stray.jpg'}: no image record in metadata.jsonl; not imported",
        f"{source / 'gp02' / 'case_counter.json'}:1: expected {{\"last_case_id\": <integer>}} ('last_case_id')",
    ]
    assert (report.images, report.case_records, report.counters) == (3, 3, 1)


def test_a_line_that_does_not_decrypt_is_reported(tmp_path: Path) -> None:
    source = tmp_path / "old"
    old_clinic(source, KEY)
    metadata = source / "gp02" / "metadata.jsonl"
    lines = metadata.read_bytes().splitlines()
    envelope = json.loads(lines[1])
    blob = bytearray(base64.urlsafe_b64decode(envelope["enc"]))
    blob[-1] ^= 1  # one flipped bit in the tag
    lines[1] = json.dumps({"enc": base64.urlsafe_b64encode(bytes(blob)).decode(), "v": 1}).encode()
    metadata.write_bytes(b"\n".join(lines) + b"\n")
    store = open_store("disk", tmp_path / "new")
    try:
        report = import_legacy(source, store, sealer=Sealer(KEY))
    finally:
        store.close()
    assert report.problems == [f"{metadata}:2: does not decrypt (damaged, or written with another key)"]
    assert report.case_records == 2


def test_a_wrong_or_missing_key_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "old"
    old_clinic(source, KEY)
    store = open_store("sqlite", tmp_path / "new")
    try:
        with pytest.raises(StoreError, match=f"^import: the key does not decrypt {source / 'gp01' / 'metadata.jsonl'}:1: wrong key\\?$"):
            import_legacy(source, store, sealer=Sealer(bytes(32)))
        with pytest.raises(StoreError, match=f"^import: {source} holds encrypted data \\({source / 'gp01' / 'metadata.jsonl'}:1\\); "
                           "give its key with --key-file or DATA_ENCRYPTION_KEY$"):
            import_legacy(source, store, sealer=Sealer(None))
        assert store.stats()["images"] == 0 and every_case(store) == []
    finally:
        store.close()


def test_the_command_reports_and_sets_its_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "old"
    old_clinic(source, KEY)
    key_file = tmp_path / "old.key"
    key_file.write_text(KEY_B64 + "\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nbackend = "disk"\nroot = "{tmp_path / "new"}"\n')
    for name in ("DATA_ENCRYPTION_KEY", "DATA_ENCRYPTION_KEY_FILE", "CREDENTIALS_DIRECTORY", "ENCRYPT_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    args = ["import-legacy", str(source), "--config", str(config), "--key-file", str(key_file)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (f"imported {source} into disk store {tmp_path / 'new'}: users 2; images 3 imported, 0 already present; "
                   "image records 3; case records 3 imported, 0 already present; counters 2 raised, 0 already as high; "
                   "0 unreadable\n")
    with open(source / "gp02" / "metadata.jsonl", "ab") as f:
        f.write(b"{oops\n")
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert err == f"appliance: cannot read {source / 'gp02' / 'metadata.jsonl'}:3: not JSON (Expecting property name enclosed in double quotes)\n"
    assert "images 0 imported, 3 already present" in out and "1 unreadable" in out
    monkeypatch.setenv("DATA_ENCRYPTION_KEY", base64.urlsafe_b64encode(bytes(32)).decode())
    assert main(args[:-2]) == 1
    assert capsys.readouterr().err == (
        f"appliance: error: import: DATA_ENCRYPTION_KEY does not decrypt {source / 'gp01' / 'metadata.jsonl'}:1: wrong key?\n"
    )


def test_counter_moves_past_imported_case_ids_without_a_counter_file(tmp_path: Path) -> None:

    root = tmp_path / "old" / "user001"
    root.mkdir(parents=True)
    lines = [{"case_id": "10007", "entry_type": "case", "status": "Confirmed", "created_at": "2026-01-01T00:00:00"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = open_store("sqlite", tmp_path / "new")
    try:
        import_legacy(tmp_path / "old", store, sealer=Sealer(None))
        assert next_case_id(store, "user001") == "10008"
    finally:
        store.close()
