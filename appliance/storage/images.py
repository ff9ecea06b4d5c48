"""Where a store keeps image bytes: files beside it (`local`) or objects in a bucket (`bucket`).

A store names each image by a key (`<user_id>/<image_id><suffix>`, `.bin` when
encrypted) and keeps that key in the image's record row; the bytes go through
an `ImagePlace`. The place never sees a record: the store decides when a put
becomes visible (its record commits after the put returns), and removes the
bytes of a save whose record never committed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

from .files import make_dir, write_atomic


class ImagePlace(Protocol):
    """Image bytes by key; every method blocks and is called from the store's thread."""

    where: str  # what messages name: a directory or a bucket URL

    def put(self, key: str, data: bytes) -> None:
        """Store `data` at `key` (overwriting); durable and checked when it returns."""

    def get(self, key: str) -> bytes | None:
        """The bytes at `key`, or None when there is nothing there."""

    def delete(self, key: str) -> None:
        """Remove what is at `key`; nothing there is fine."""


def image_key(user_id: str, image_id: str, suffix: str, *, sealed: bool) -> str:
    """The key of an image: encrypted bytes are named .bin, no longer a .jpg, .png or .webp."""
    return f"{user_id}/{image_id}{'.bin' if sealed else suffix}"


class LocalImages:
    """Files under one directory, written durably (temp, fsync, rename, fsync dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.where = str(self.directory)

    def path(self, key: str) -> Path:
        return self.directory / key

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        make_dir(path.parent)
        write_atomic(path, data)

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()
