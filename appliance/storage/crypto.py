"""Encryption at rest: AES-GCM for image files and records, bound to the record they belong to.

New writes use format v2, whose associated data names the user and the image
(or case) a ciphertext belongs to, so one moved to another user's record, or
to another record, does not decrypt:

- an image file is `MAGIC_V2 || nonce (12 bytes) || ciphertext+tag`, bound to
  ("image", user id, image id);
- a record is the JSON line `{"enc": urlsafe_b64(MAGIC_V2 || nonce || ct+tag),
  "v": 2, "id": "<kind>:<id>"}`, bound to (kind, user id, id) where kind is
  "image-record" or "case-record"; once decrypted, the record must be the one
  its `id` names.

The user id comes from where the data sits (its folder or row), never from the
data. Format v1, the old server's (`nonce || ciphertext+tag` and
`{"enc": ..., "v": 1}`, no associated data), is still read, so its encrypted
`disk` stores open here; `appliance import-legacy --reencrypt` rewrites v1 data
as v2. Every nonce is random (96 bits): a store encrypts far fewer than the
2^32 messages per key where that becomes a concern.

The key is URL-safe base64 of 16, 24 or 32 bytes, taken from (first found)
`DATA_ENCRYPTION_KEY`, the file named by `DATA_ENCRYPTION_KEY_FILE`, the file
`storage.key_file`, or the systemd credential `data-encryption-key`
(`$CREDENTIALS_DIRECTORY`); never from config.toml itself. A store opened with
encryption keeps a key check value, `key_check.json`, at its root: a wrong
key, encryption turned off on an encrypted store, or on on a plain one, stops
the store from opening with one line naming the cause.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError, StoreError
from . import CASE_ENTRY_TYPES
from . import records as R
from .files import write_atomic

NONCE_BYTES = 12
# Starts every v2 ciphertext. A v1 one starts with its random nonce, so one in 2^48 looks
# like v2; `_decrypt` then falls back to reading it as v1.
MAGIC_V2 = b"\xffDAv2\n"
KEY_CHECK = "key_check.json"  # has a dot, so never taken for a user folder
CREDENTIAL_NAME = "data-encryption-key"
# Encrypted under the key at first open; decrypting it proves the key before any record is read.
_CHECK_PLAINTEXT = b"derm-appliance key check v1"


def decode_key(text: str, source: str) -> bytes:
    """The AES key in `text` (URL-safe base64 of 16, 24 or 32 bytes); ConfigError naming `source`."""
    text = text.strip()
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: expected URL-safe base64 of a 16, 24 or 32-byte key; not base64") from None
    if len(key) not in (16, 24, 32):
        raise ConfigError(f"{source}: expected URL-safe base64 of a 16, 24 or 32-byte key; got {len(key)} bytes")
    return key


class MissingKey(ConfigError):
    """Encryption is on but no key source is set."""


def read_key_file(path: Path, source: str) -> bytes:
    """The key in a file (surrounding whitespace ignored); ConfigError naming `source`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{source}: cannot read key file {path}: {reason}") from None
    return decode_key(text, f"{source} ({path})")


def load_sealer(encrypt: bool, key_file: Path | None, environ: Mapping[str, str] | None = None) -> Sealer:
    """The store's Sealer: pass-through when `encrypt` is off, else AES-GCM with the configured key."""
    environ = os.environ if environ is None else environ
    if not encrypt:
        return Sealer(None)
    if environ.get("DATA_ENCRYPTION_KEY", "").strip():
        return Sealer(decode_key(environ["DATA_ENCRYPTION_KEY"], "DATA_ENCRYPTION_KEY"), "DATA_ENCRYPTION_KEY")
    if environ.get("DATA_ENCRYPTION_KEY_FILE", "").strip():
        path = Path(environ["DATA_ENCRYPTION_KEY_FILE"].strip())
        return Sealer(read_key_file(path, "DATA_ENCRYPTION_KEY_FILE"), "DATA_ENCRYPTION_KEY_FILE")
    if key_file is not None:
        return Sealer(read_key_file(key_file, "storage.key_file"), "storage.key_file")
    credentials = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    if credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
        source = f"credential {CREDENTIAL_NAME}"
        return Sealer(read_key_file(Path(credentials) / CREDENTIAL_NAME, source), source)
    raise MissingKey(
        "storage.encrypt (ENCRYPT_STORAGE) is on but no key is set: set DATA_ENCRYPTION_KEY, "
        f"DATA_ENCRYPTION_KEY_FILE, storage.key_file or the systemd credential {CREDENTIAL_NAME}"
    )


def is_sealed_record(value: Any) -> bool:
    """True for an encrypted record envelope: v1 `{"enc": ..., "v": 1}` or v2 `{"enc": ..., "v": 2, "id": ...}`."""
    return isinstance(value, dict) and set(value) in ({"enc", "v"}, {"enc", "v", "id"})


def binding(kind: str, user_id: str, ref: str) -> bytes:
    """The v2 associated data of (kind, user, id): what a ciphertext is bound to."""
    return "\0".join(("derm-appliance v2", kind, user_id, ref)).encode()


def record_id(record: dict[str, Any]) -> str:
    """A record's identity as the v2 envelope names it: "case-record:<case_id>" or "image-record:<image_id>"."""
    if record.get("entry_type") in CASE_ENTRY_TYPES:
        return f"case-record:{record.get('case_id')}"
    return f"image-record:{record.get('image_id')}"


class Sealer:
    """Encrypts image bytes and records when it has a key; passes them through when it has none."""

    def __init__(self, key: bytes | None, source: str = "the key") -> None:
        self._aead = None if key is None else AESGCM(key)
        self.source = source  # where the key came from, for error messages

    @property
    def enabled(self) -> bool:
        return self._aead is not None

    # -- bytes --------------------------------------------------------------

    def seal(self, data: bytes, ad: bytes) -> bytes:
        """v2 `MAGIC_V2 || nonce || ciphertext+tag` of `data` bound to `ad` (see `binding`), or `data` without a key."""
        if self._aead is None:
            return data
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC_V2 + nonce + self._aead.encrypt(nonce, data, ad)

    def unseal(self, blob: bytes, where: str, ad: bytes | None) -> bytes:
        """The plaintext of a v2 blob bound to `ad`, or of a v1 blob; StoreError naming `where` when it does not decrypt."""
        if self._aead is None:
            return blob
        plain = self._decrypt(blob, ad)
        if plain is None:
            why = "wrong key or damaged data" if ad is None else "wrong key, damaged data, or moved from another record"
            raise StoreError(f"storage: {self.source} does not decrypt {where}: {why}")
        return plain

    def _decrypt(self, blob: bytes, ad: bytes | None) -> bytes | None:
        """v2 (when `blob` starts with MAGIC_V2 and `ad` is given) else v1; None when neither decrypts."""
        assert self._aead is not None
        if ad is not None and blob.startswith(MAGIC_V2):
            body = blob[len(MAGIC_V2):]
            try:
                return self._aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], ad)
            except (InvalidTag, ValueError):
                pass  # a v1 blob whose nonce happens to start with the magic: try it as v1
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None)
        except (InvalidTag, ValueError):
            return None

    # -- records ------------------------------------------------------------

    def dumps(self, record: dict[str, Any], user_id: str) -> str:
        """One JSON line for `user_id`'s record: the record itself, or its v2 envelope."""
        text = R.dumps(record)
        if self._aead is None:
            return text
        ident = record_id(record)
        kind, _, ref = ident.partition(":")
        blob = self.seal(text.encode(), binding(kind, user_id, ref))
        return json.dumps({"enc": base64.urlsafe_b64encode(blob).decode(), "v": 2, "id": ident})

    def loads(self, text: str | bytes, where: str, user_id: str) -> dict[str, Any]:
        """`user_id`'s record from a `dumps` line; StoreError naming `where` if it cannot be read as one."""
        try:
            value = json.loads(text)
        except ValueError:
            raise StoreError(f"storage: {where} is not a JSON record") from None
        if is_sealed_record(value):
            if self._aead is None:
                raise StoreError(f"storage: {where} is encrypted but storage.encrypt (ENCRYPT_STORAGE) is off")
            value = self.open_envelope(value, where, user_id)
        if not isinstance(value, dict):
            raise StoreError(f"storage: {where} is not a JSON record")
        return value

    def open_envelope(self, envelope: dict[str, Any], where: str, user_id: str) -> Any:
        """The JSON value inside a v1 or v2 envelope of `user_id`'s; StoreError naming `where` if it does not decrypt.

        A v2 record must also be the record its envelope names (a copy of another record of the same user's
        decrypts, but is refused here).
        """
        sample = envelope_bytes(envelope, user_id)
        if sample is None:
            raise StoreError(f"storage: {where}: unknown or damaged encrypted record (version {envelope.get('v')!r})")
        blob, ad = sample
        plain = self.unseal(blob, where, ad)
        try:
            value = json.loads(plain)
        except ValueError:
            raise StoreError(f"storage: {where} decrypts to something that is not JSON") from None
        if envelope["v"] == 2 and (not isinstance(value, dict) or record_id(value) != envelope["id"]):
            raise StoreError(f"storage: {where} is sealed as {envelope['id']} but holds another record")
        return value

    # -- the store's key check ---------------------------------------------

    def check_root(
        self, root: Path, *, plain_data: str | None, sealed_sample: tuple[str, bytes, bytes | None] | None
    ) -> None:
        """`check_key` with the check value in `root`/key_check.json, written there on first use."""
        check = root / KEY_CHECK
        stored = None
        if check.exists():
            try:
                stored = (str(check), base64.urlsafe_b64decode(json.loads(check.read_bytes())["check"]))
            except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
                raise StoreError(f"storage: {check} is unreadable ({e}); restore it from a backup") from None
        new = self.check_key(str(root), stored, plain_data=plain_data, sealed_sample=sealed_sample)
        if new is not None:
            body = {"check": base64.urlsafe_b64encode(new).decode(), "v": 1}
            try:
                write_atomic(check, json.dumps(body).encode())
            except OSError as e:
                raise StoreError(f"storage: cannot write {check}: {e.strerror or e}") from e

    def check_key(
        self, label: str, stored: tuple[str, bytes] | None, *, plain_data: str | None,
        sealed_sample: tuple[str, bytes, bytes | None] | None,
    ) -> bytes | None:
        """Refuse a wrong key or a mix of plain and encrypted data; the check value to store on first use, else None.

        `stored` is (where, blob) of the check value the store keeps (a file, a database row), if any;
        `plain_data` names something unencrypted already stored (or None);
        `sealed_sample` is (where, bytes, associated data) of something encrypted already stored.
        """
        if self._aead is None:
            what = stored[0] if stored is not None else (sealed_sample[0] if sealed_sample is not None else None)
            if what is not None:
                raise StoreError(
                    f"storage: {label} is encrypted ({what}) but storage.encrypt (ENCRYPT_STORAGE) is off; "
                    "turn it on and set the key"
                )
            return None
        if stored is not None:
            if self._decrypt(stored[1], None) is None:
                raise StoreError(f"storage: {self.source} does not decrypt {stored[0]}: wrong key?")
            return None
        if plain_data is not None:
            raise StoreError(
                f"storage: {label} holds unencrypted data ({plain_data}) and storage.encrypt (ENCRYPT_STORAGE) "
                "is on; encryption is only turned on for an empty store (see README, Encryption at rest)"
            )
        if sealed_sample is not None:
            where, blob, ad = sealed_sample
            if self._decrypt(blob, ad) is None:
                raise StoreError(f"storage: {self.source} does not decrypt {where}: wrong key?")
        # The check value stays v1 (no associated data): it belongs to no user or record.
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, _CHECK_PLAINTEXT, None)


def envelope_bytes(line: bytes | str | dict[str, Any], user_id: str) -> tuple[bytes, bytes | None] | None:
    """(sealed bytes, associated data) inside `user_id`'s encrypted record line or envelope; None if it is not one."""
    try:
        value = json.loads(line) if isinstance(line, (bytes, str)) else line
        if not is_sealed_record(value) or not isinstance(value["enc"], str):
            return None
        blob = base64.urlsafe_b64decode(value["enc"])
    except (ValueError, binascii.Error):
        return None
    if value["v"] == 1 and "id" not in value:
        return blob, None
    # A v2 envelope holds only v2 bytes: a v1 blob (no associated data) wrapped in one would be movable.
    if value["v"] == 2 and isinstance(value.get("id"), str) and ":" in value["id"] and blob.startswith(MAGIC_V2):
        kind, _, ref = value["id"].partition(":")
        return blob, binding(kind, user_id, ref)
    return None


def image_binding(user_id: str, image_id: str) -> bytes:
    """The associated data of an image file."""
    return binding("image", user_id, image_id)
