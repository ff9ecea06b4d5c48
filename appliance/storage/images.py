"""Where a store keeps image bytes: files beside it (`local`) or objects in a bucket (`bucket`).

A store names each image by a key (`<user_id>/<image_id><suffix>`, `.bin` when
encrypted) and keeps that key in the image's record row; the bytes go through
an `ImagePlace`. The place never sees a record: the store decides when a put
becomes visible (its record commits after the put returns), and removes the
bytes of a save whose record never committed. A store that encrypts seals the
bytes before the put, so a bucket holds what a local file would.

`storage.images = "bucket"` is for stateless instances on a back end that keeps
records apart from image files (postgres); a box on sqlite or disk keeps its
images on its disk and forwards them with sync.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..buckets.target import IntegrityError, Target, sha256_hex
from ..errors import ConfigError, StoreError, StoreUnavailable
from .files import make_dir, write_atomic

if TYPE_CHECKING:
    from ..buckets.config import BucketConfig
    from .config import StorageConfig

log = logging.getLogger("appliance.storage")

# Where local images live under a store's root (as the sqlite store's images/).
LOCAL_DIR = "images"
CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class ImagePlace(Protocol):
    """Image bytes by key; every method blocks and is called from the store's thread."""

    where: str  # what messages name: a directory or a bucket URL

    def put(self, key: str, data: bytes) -> None:
        """Store `data` at `key` (overwriting); durable and checked when it returns."""

    def get(self, key: str) -> bytes | None:
        """The bytes at `key`, or None when there is nothing there."""

    def delete(self, key: str) -> None:
        """Remove what is at `key`; nothing there is fine."""

    def check(self) -> None:
        """Raise StoreUnavailable when the place does not answer (for /ready); cheap enough for every probe."""


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

    def check(self) -> None:
        """Files on this machine's disk: the store's own errors say when they fail."""


class BucketImages:
    """Objects under a bucket URL's prefix (`<prefix>/<user_id>/<image_id><suffix>`), through a buckets Target.

    Every put is checked as sync's uploads are (sha256 sent and compared, per
    provider); every get compares the bytes with the sha256 stored beside them.
    A bucket that does not answer raises StoreUnavailable (503, Retry-After),
    logged once per outage rather than once per request.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.where = target.url.split("?", 1)[0]  # what messages name: never a query's signature
        self._down = False  # inside an outage: logged when it began, logged again when it ends
        self._down_lock = threading.Lock()
        self._next_probe = 0.0  # monotonic time of the next probe `check` may make

    def put(self, key: str, data: bytes) -> None:
        content_type = CONTENT_TYPES.get(Path(key).suffix, "application/octet-stream")
        with self._answering(f"storing image {key}"):
            self.target.put_sync(key, bytes(data), content_type)

    def get(self, key: str) -> bytes | None:
        with self._answering(f"reading image {key}"):
            found = self.target.read_sync(key)
        if found is None:
            return None
        data, attributes = found
        # Objects this appliance wrote carry their sha256; one whose bytes changed since is damage.
        stored = attributes.get("sha256")
        if stored is not None and stored != sha256_hex(data):
            raise StoreError(f"image {key} in {self.where}: its bytes' sha256 {sha256_hex(data)} differs from "
                             f"the {stored} stored with it")
        return data

    def delete(self, key: str) -> None:
        with self._answering(f"removing image {key}"):
            self.target.delete_sync(key)

    # A probe is one small GET; between probes `check` answers from the last one and what calls saw, so a
    # load balancer's frequent /ready never queues the store's thread behind a bucket that times out.
    PROBE_INTERVAL_S = 5.0
    PROBE_KEY = ".appliance-probe"  # never an image's key: ids have no dots

    def check(self) -> None:
        """StoreUnavailable while the bucket does not answer, from a probe at most every PROBE_INTERVAL_S."""
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + self.PROBE_INTERVAL_S
            self.get(self.PROBE_KEY)  # StoreUnavailable now if it does not answer; an answer ends an outage
        elif self._down:
            raise StoreUnavailable("the image bucket does not answer; try again later")

    @contextlib.contextmanager
    def _answering(self, action: str) -> Iterator[None]:
        """Turn the bucket's failures into StoreError / StoreUnavailable with one line each."""
        # obstore only now: a box keeping its images on disk never loads it.
        from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError

        try:
            yield
        except IntegrityError as e:
            raise StoreError(f"{action} in {self.where}: {e.detail}") from None
        except (NotFoundError, FileNotFoundError):
            # A missing object is None (get) or fine (delete) in the target; what is left is the bucket itself.
            raise StoreError(f"{action} in {self.where}: no such bucket or container (storage.images_url)") from None
        except (PermissionDeniedError, UnauthenticatedError, PermissionError) as e:
            raise StoreError(f"{action} in {self.where}: the bucket refuses the appliance's credentials "
                             f"(bucket.credentials_file): {_first_line(e)}") from None
        except (BaseError, OSError) as e:  # obstore raises some failures as built-in OSErrors
            with self._down_lock:
                began, self._down = not self._down, True
            if began:
                log.warning("image bucket %s does not answer (%s): %s", self.where, action, _first_line(e))
            # The client learns only that it may retry; which bucket and why are in the log, once per outage.
            raise StoreUnavailable("the image bucket does not answer; try again later") from None
        with self._down_lock:
            ended, self._down = self._down, False
        if ended:
            log.warning("image bucket %s answers again", self.where)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_images(storage: StorageConfig, *, sync_enabled: bool = False) -> None:
    """`storage.images = "bucket"` needs a bucket URL and a back end that keeps images through a place.

    And the other way round: a back end whose instances share one outbox (postgres) needs its images
    in the bucket when sync is on, since any instance may upload any image.
    """
    from . import takes_images

    if storage.images != "bucket":
        if sync_enabled and takes_images(storage.backend):
            raise ConfigError(
                f'storage.images: with storage.backend = "{storage.backend}" and sync on, every instance drains '
                'one shared outbox and may upload any image, so the images must be where all of them read them: '
                'set storage.images = "bucket" (and storage.images_url)'
            )
        return
    if not takes_images(storage.backend):
        raise ConfigError(
            f'storage.images: "bucket" needs a back end that keeps its records apart from its images, '
            f'storage.backend = "postgres"; got storage.backend = {storage.backend!r}, which keeps its images '
            f"on its disk (sync forwards them to a bucket)"
        )
    if not storage.images_url:
        raise ConfigError('storage.images_url: expected a bucket URL (s3://, gs://, az:// or https://) when '
                          'storage.images = "bucket"')
    from ..buckets import check_url

    check_url(storage.images_url, "storage.images_url")


def open_images(storage: StorageConfig, bucket: BucketConfig, root: Path) -> ImagePlace:
    """The place `storage.images` names: the bucket at `storage.images_url`, else files under `root`/images."""
    if storage.images != "bucket":
        return LocalImages(Path(root) / LOCAL_DIR)
    from ..buckets import open_target

    return BucketImages(open_target(storage.images_url, bucket))
