"""Encryption at rest: AES-GCM for image files and records, in the old server's format.

An image file is `nonce (12 bytes) || ciphertext+tag`; a record is the JSON line
`{"enc": urlsafe_b64(nonce || ciphertext+tag), "v": 1}` with no associated
data, exactly as the old server wrote them, so its encrypted `disk` stores
open here and ours open there. Every nonce is random (96 bits): a store
encrypts far fewer than the 2^32 messages per key where that becomes a concern.

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
from . import records as R
from .files import write_atomic

NONCE_BYTES = 12
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
    """True for the old server's encrypted record envelope `{"enc": ..., "v": 1}`."""
    return isinstance(value, dict) and set(value) == {"enc", "v"}


class Sealer:
    """Encrypts image bytes and records when it has a key; passes them through when it has none."""

    def __init__(self, key: bytes | None, source: str = "the key") -> None:
        self._aead = None if key is None else AESGCM(key)
        self.source = source  # where the key came from, for error messages

    @property
    def enabled(self) -> bool:
        return self._aead is not None

    # -- bytes --------------------------------------------------------------

    def seal(self, data: bytes) -> bytes:
        """`nonce || ciphertext+tag` of `data` (or `data` itself without a key)."""
        if self._aead is None:
            return data
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, None)

    def unseal(self, blob: bytes, where: str) -> bytes:
        """The plaintext of `seal`'s output; StoreError naming `where` when it does not decrypt."""
        if self._aead is None:
            return blob
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None)
        except (InvalidTag, ValueError):
            raise StoreError(f"storage: {self.source} does not decrypt {where}: wrong key or damaged data") from None

    # -- records ------------------------------------------------------------

    def dumps(self, record: dict[str, Any]) -> str:
        """One JSON line for a record: the record itself, or its encrypted envelope."""
        text = R.dumps(record)
        if self._aead is None:
            return text
        return json.dumps({"enc": base64.urlsafe_b64encode(self.seal(text.encode())).decode(), "v": 1})

    def loads(self, text: str | bytes, where: str) -> dict[str, Any]:
        """A record from a `dumps` line; StoreError naming `where` if it cannot be read as one."""
        try:
            value = json.loads(text)
        except ValueError:
            raise StoreError(f"storage: {where} is not a JSON record") from None
        if is_sealed_record(value):
            if self._aead is None:
                raise StoreError(f"storage: {where} is encrypted but storage.encrypt (ENCRYPT_STORAGE) is off")
            value = self.open_envelope(value, where)
        if not isinstance(value, dict):
            raise StoreError(f"storage: {where} is not a JSON record")
        return value

    def open_envelope(self, envelope: dict[str, Any], where: str) -> Any:
        """The JSON value inside `{"enc": ..., "v": 1}`; StoreError naming `where` if it does not decrypt."""
        if envelope.get("v") != 1 or not isinstance(envelope.get("enc"), str):
            raise StoreError(f"storage: {where}: unknown encrypted record version {envelope.get('v')!r}")
        try:
            blob = base64.urlsafe_b64decode(envelope["enc"])
        except (binascii.Error, ValueError):
            raise StoreError(f"storage: {where}: encrypted record is not base64") from None
        plain = self.unseal(blob, where)
        try:
            return json.loads(plain)
        except ValueError:
            raise StoreError(f"storage: {where} decrypts to something that is not JSON") from None

    # -- the store's key check ---------------------------------------------

    def check_root(self, root: Path, *, plain_data: str | None, sealed_sample: tuple[str, bytes] | None) -> None:
        """Refuse a wrong key or a mix of plain and encrypted data; write the key check value on first use.

        `plain_data` names something unencrypted already stored (or None);
        `sealed_sample` is (where, bytes) of something encrypted already stored.
        """
        check = root / KEY_CHECK
        if self._aead is None:
            what = str(check) if check.exists() else (sealed_sample[0] if sealed_sample is not None else None)
            if what is not None:
                raise StoreError(
                    f"storage: {root} is encrypted ({what}) but storage.encrypt (ENCRYPT_STORAGE) is off; "
                    "turn it on and set the key"
                )
            return
        if check.exists():
            try:
                envelope = json.loads(check.read_bytes())
                blob = base64.urlsafe_b64decode(envelope["check"])
            except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
                raise StoreError(f"storage: {check} is unreadable ({e}); restore it from a backup") from None
            try:
                self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None)
            except (InvalidTag, ValueError):
                raise StoreError(f"storage: {self.source} does not decrypt {check}: wrong key?") from None
            return
        if plain_data is not None:
            raise StoreError(
                f"storage: {root} holds unencrypted data ({plain_data}) and storage.encrypt (ENCRYPT_STORAGE) "
                "is on; encryption is only turned on for an empty store (see README, Encryption at rest)"
            )
        if sealed_sample is not None:
            where, blob = sealed_sample
            try:
                self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None)
            except (InvalidTag, ValueError):
                raise StoreError(f"storage: {self.source} does not decrypt {where}: wrong key?") from None
        body = {"check": base64.urlsafe_b64encode(self.seal(_CHECK_PLAINTEXT)).decode(), "v": 1}
        try:
            write_atomic(check, json.dumps(body).encode())
        except OSError as e:
            raise StoreError(f"storage: cannot write {check}: {e.strerror or e}") from e


def envelope_bytes(line: bytes | str) -> bytes | None:
    """The `nonce || ciphertext+tag` inside an encrypted record line, or None if it is not one."""
    try:
        value = json.loads(line)
        if is_sealed_record(value) and isinstance(value["enc"], str):
            return base64.urlsafe_b64decode(value["enc"])
    except (ValueError, binascii.Error):
        pass
    return None
