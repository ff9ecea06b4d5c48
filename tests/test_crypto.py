"""Encryption at rest (appliance/storage/crypto.py): both stores through the real server, keys, refusals."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.app import create_app
from appliance.cases import log_case, next_case_id
from appliance.config import load_config
from appliance.errors import ConfigError, StoreError
from appliance.keys import STORE
from appliance.storage import BACKENDS, open_store
from appliance.storage.crypto import Sealer, load_sealer

from .conftest import encode, photo
from .test_api import USER, check
from .test_legacy import KEY, KEY_B64, old_clinic

OTHER_KEY_B64 = base64.urlsafe_b64encode(bytes(16)).decode()


def old_decrypt(blob: bytes) -> bytes:
    """Decrypt as the old server did: nonce = first 12 bytes, no associated data."""
    return AESGCM(KEY).decrypt(blob[:12], blob[12:], None)


def v2_decrypt(blob: bytes, kind: str, user_id: str, ref: str) -> bytes:
    """Decrypt format v2 as the README states it: magic, nonce, ciphertext; bound to (kind, user, id)."""
    magic = b"\xffDAv2\n"
    assert blob.startswith(magic)
    ad = "\0".join(("derm-appliance v2", kind, user_id, ref)).encode()
    return AESGCM(KEY).decrypt(blob[len(magic):len(magic) + 12], blob[len(magic) + 12:], ad)


# The back ends whose key check is a file under the root (postgres keeps it in the database, and its
# encryption tests are in tests/test_storage_postgres.py).
@pytest.fixture(params=sorted(b for b in BACKENDS if b != "postgres"))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "data-encryption-key"
    path.write_text(KEY_B64 + "\n")
    return path


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA_ENCRYPTION_KEY", "DATA_ENCRYPTION_KEY_FILE", "CREDENTIALS_DIRECTORY", "ENCRYPT_STORAGE"):
        monkeypatch.delenv(name, raising=False)


async def test_round_trip_through_the_server_leaves_no_plaintext(
    aiohttp_client: Any, make_config: Any, backend: str, key_file: Path, tmp_path: Path
) -> None:
    config = make_config(storage__backend=backend, storage__encrypt=True, storage__key_file=str(key_file))
    client = await aiohttp_client(create_app(config))
    upload = encode(photo(seed=7))
    status, body = await check(client, upload)
    assert status == 200
    response = await client.post("/cases", json={"case_id": body["case_id"], "notes": "itchy, 3 weeks"},
                                 headers=USER)
    assert response.status == 200
    response = await client.put(f"/cases/{body['case_id']}", json={"status": "confirmed"}, headers=USER)
    assert response.status == 200
    store = client.app[STORE]
    assert store.read_image("user001", body["image_id"]) == upload
    await client.close()

    root = tmp_path / "data"
    files = [p for p in root.rglob("*") if p.is_file()]
    images = [p for p in files if p.name.startswith(body["image_id"])]
    assert [p.suffix for p in images] == [".bin"]
    assert v2_decrypt(images[0].read_bytes(), "image", "user001", body["image_id"]) == upload
    for path in files:
        data = path.read_bytes()
        # A 64-byte run of the JPEG, not its 3-byte marker: random ciphertext
        # holds any given 3 bytes somewhere about once in 170 files this size.
        assert not data.startswith(b"\xff\xd8"), path
        assert upload[len(upload) // 2 : len(upload) // 2 + 64] not in data, path
        assert b"itchy" not in data and b"predictions" not in data, path
    if backend == "disk":
        lines = (root / "user001" / "metadata.jsonl").read_bytes().splitlines()
        envelopes = [json.loads(line) for line in lines]
        assert [(e["v"], e["id"]) for e in envelopes] == [
            (2, f"image-record:{body['image_id']}"), (2, f"case-record:{body['case_id']}")]
        records = [json.loads(v2_decrypt(base64.urlsafe_b64decode(e["enc"]), *e["id"].split(":")[:1], "user001",
                                         e["id"].split(":", 1)[1])) for e in envelopes]
        assert [r.get("entry_type") for r in records] == [None, "case"]
        assert records[1]["notes"] == "itchy, 3 weeks" and records[1]["status"] == "confirmed"
    else:
        with sqlite3.connect(root / "appliance.db") as db:
            rows = db.execute("SELECT user_id, case_id, entry_type, status_key, record FROM cases").fetchall()
        [(user_id, case_id, entry_type, status_key, record)] = rows
        assert (user_id, case_id, entry_type, status_key) == ("user001", body["case_id"], "case", "confirmed")
        blob = base64.urlsafe_b64decode(json.loads(record)["enc"])
        assert json.loads(v2_decrypt(blob, "case-record", "user001", case_id))["notes"] == "itchy, 3 weeks"

    # A restart with the same key reads everything back.
    client = await aiohttp_client(create_app(config))
    response = await client.get("/cases", headers=USER)
    [case] = (await response.json())["cases"]
    assert case["notes"] == "itchy, 3 weeks" and case["image_ids"] == [body["image_id"]]
    assert client.app[STORE].list_images("user001")[0]["case_status"] == "confirmed"


async def test_a_wrong_key_stops_start_up(
    aiohttp_client: Any, make_config: Any, backend: str, key_file: Path, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(
        make_config(storage__backend=backend, storage__encrypt=True, storage__key_file=str(key_file))
    ))
    assert (await check(client, encode(photo(seed=8))))[0] == 200
    await client.close()
    wrong = tmp_path / "wrong-key"
    wrong.write_text(OTHER_KEY_B64)
    check_file = tmp_path / "data" / "key_check.json"
    # The server's own start-up (the store's cleanup context) fails, before any request is served.
    server = TestServer(create_app(
        make_config(storage__backend=backend, storage__encrypt=True, storage__key_file=str(wrong))
    ))
    try:
        with pytest.raises(StoreError, match=f"^storage: storage.key_file does not decrypt {check_file}: wrong key\\?$"):
            await server.start_server()
    finally:
        await server.close()


def test_encryption_is_neither_turned_off_nor_on_under_existing_data(tmp_path: Path, backend: str) -> None:
    root = tmp_path / "data"
    store = open_store(backend, root, sealer=Sealer(KEY))
    log_case(store, "u1", {"case_id": "10000", "entry_type": "case", "created_at": "2025-01-01"})
    store.close()
    with pytest.raises(StoreError, match=f"^storage: {root} is encrypted \\({root / 'key_check.json'}\\) but "
                       "storage.encrypt \\(ENCRYPT_STORAGE\\) is off; turn it on and set the key$"):
        open_store(backend, root)

    plain_root = tmp_path / "plain"
    store = open_store(backend, plain_root)
    log_case(store, "u1", {"case_id": "10000", "entry_type": "case", "created_at": "2025-01-01"})
    store.close()
    where = plain_root / "u1" / "metadata.jsonl:1" if backend == "disk" else f"records in {plain_root / 'appliance.db'}"
    with pytest.raises(StoreError, match=f"^storage: {plain_root} holds unencrypted data \\({where}\\) and "
                       "storage.encrypt \\(ENCRYPT_STORAGE\\) is on; encryption is only turned on for an empty store"):
        open_store(backend, plain_root, sealer=Sealer(KEY))


def test_disk_store_opens_the_old_servers_encrypted_tree(tmp_path: Path) -> None:
    root = tmp_path / "old"
    jpegs = old_clinic(root, KEY)
    with pytest.raises(StoreError, match=f"^storage: {root} is encrypted \\({root / 'gp01' / 'metadata.jsonl'}:1\\)"):
        open_store("disk", root)
    with pytest.raises(StoreError, match=f"^storage: the key does not decrypt {root / 'gp01' / 'metadata.jsonl'}:1: wrong key\\?$"):
        open_store("disk", root, sealer=Sealer(bytes(32)))
    store = open_store("disk", root, sealer=Sealer(KEY))
    try:
        assert store.read_image("gp01", "img-a2") == jpegs["img-a2"]
        assert [r["image_id"] for r in store.list_images("gp01")] == ["img-a1", "img-a2"]
        assert next_case_id(store, "gp01") == "10002"
    finally:
        store.close()
    assert (root / "key_check.json").exists()

    # One damaged line in an encrypted store is a loud failure naming it, never a silently missing record.
    metadata = root / "gp02" / "metadata.jsonl"
    lines = metadata.read_bytes().splitlines()
    lines[0] = json.dumps({"enc": base64.urlsafe_b64encode(bytes(40)).decode(), "v": 1}).encode()
    metadata.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(StoreError, match=f"^storage: the key does not decrypt {metadata}:1: wrong key or damaged data$"):
        open_store("disk", root, sealer=Sealer(KEY))


def test_key_sources_in_order(tmp_path: Path, key_file: Path) -> None:
    other = tmp_path / "other-key"
    other.write_text(OTHER_KEY_B64)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "data-encryption-key").write_text(OTHER_KEY_B64)
    env = {"DATA_ENCRYPTION_KEY": KEY_B64, "DATA_ENCRYPTION_KEY_FILE": str(other), "CREDENTIALS_DIRECTORY": str(credentials)}
    assert load_sealer(True, other, env).source == "DATA_ENCRYPTION_KEY"
    assert load_sealer(True, key_file, {**env, "DATA_ENCRYPTION_KEY": ""}).source == "DATA_ENCRYPTION_KEY_FILE"
    assert load_sealer(True, key_file, {"CREDENTIALS_DIRECTORY": str(credentials)}).source == "storage.key_file"
    sealer = load_sealer(True, None, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert sealer.source == "credential data-encryption-key" and sealer.enabled
    assert not load_sealer(False, key_file, env).enabled
    # The key round-trips: what one source's sealer seals, the same key from another source opens.
    blob = load_sealer(True, key_file, {}).seal(b"x", b"ad")
    assert load_sealer(True, None, {"DATA_ENCRYPTION_KEY": KEY_B64}).unseal(blob, "blob", b"ad") == b"x"


def test_key_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^storage.encrypt \\(ENCRYPT_STORAGE\\) is on but no key is set: set "
                       "DATA_ENCRYPTION_KEY, DATA_ENCRYPTION_KEY_FILE, storage.key_file or the systemd credential "
                       "data-encryption-key$"):
        load_sealer(True, None, {})
    with pytest.raises(ConfigError, match="^DATA_ENCRYPTION_KEY: expected URL-safe base64 of a 16, 24 or 32-byte key; "
                       "got 20 bytes$"):
        load_sealer(True, None, {"DATA_ENCRYPTION_KEY": base64.urlsafe_b64encode(bytes(20)).decode()})
    with pytest.raises(ConfigError, match="^DATA_ENCRYPTION_KEY: expected URL-safe base64 of a 16, 24 or 32-byte key; "
                       "not base64$"):
        load_sealer(True, None, {"DATA_ENCRYPTION_KEY": "not*base64"})
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"^storage.key_file: cannot read key file {missing}: No such file or directory$"):
        load_sealer(True, missing, {})


def test_old_variables_switch_it_on(tmp_path: Path) -> None:
    assert load_config(None, environ={"ENCRYPT_STORAGE": "yes"}).storage.encrypt is True
    assert load_config(None, environ={"ENCRYPT_STORAGE": "0"}).storage.encrypt is False
    with pytest.raises(ConfigError, match="^storage.encrypt: expected true or false; got 'maybe'$"):
        load_config(None, environ={"ENCRYPT_STORAGE": "maybe"})
    config = tmp_path / "config.toml"
    config.write_text('[storage]\nencrypt = true\nkey_file = "secrets/key"\n')
    assert load_config(config, environ={}).storage.key_file == tmp_path / "secrets" / "key"


def test_check_config_refuses_encryption_without_a_key(tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.__main__ import main

    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{tiny_model_dir}"\n[storage]\nencrypt = true\n')
    assert main(["check-config", "--config", str(config)]) == 1
    assert capsys.readouterr().err == (
        "appliance: error: storage.encrypt (ENCRYPT_STORAGE) is on but no key is set: set DATA_ENCRYPTION_KEY, "
        "DATA_ENCRYPTION_KEY_FILE, storage.key_file or the systemd credential data-encryption-key\n"
    )
