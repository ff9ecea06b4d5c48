"""Deterministic object keys: the same record always lands on the same key, so a retry overwrites itself.

Layout under the target URL's prefix::

    <box_id>/images/<user_id>/<yyyy>/<mm>/<dd>/<image_id>.<jpg|png|webp>   the image (metadata stripped)
    <box_id>/images/<user_id>/<yyyy>/<mm>/<dd>/<image_id>.json             its record, beside it
    <box_id>/cases/<user_id>/<case_id>.json                                 the case/uncertain/reject record

Image keys carry the user id because image ids are only unique per user
(imported legacy ids are free-form): without it two users' images could
overwrite each other. Boxes before issue 13 wrote `images/<yyyy>/...` without
it; those objects stay where they are, and jobs queued then upload to the new
layout.

The date is the record's own `created_at` (UTC), never the upload time, so
every retry and every later re-upload of a changed record finds the same key;
a record without a readable `created_at` goes under `images/<user_id>/undated/`. The
store keeps one case record per (user, case id), so its key has no entry type:
a case first logged as uncertain and later confirmed is one object, updated.
"""

from __future__ import annotations

import re
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..contract import IMAGE_FORMATS

JSON_TYPE = "application/json"


def default_box_id(machine_id_file: Path = Path("/etc/machine-id")) -> str:
    """The host name, plus the first 8 characters of /etc/machine-id when readable.

    Stable across restarts; the machine-id part keeps boxes cloned from one
    image (same host name) apart. Set `sync.box_id` to choose a name.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]).strip("-") or "box"
    try:
        machine = machine_id_file.read_text(encoding="ascii").strip()[:8]
    except (OSError, UnicodeDecodeError):
        machine = ""
    return f"{name}-{machine}" if re.fullmatch(r"[0-9a-f]{8}", machine) else name


def _day(record: dict[str, Any]) -> str:
    try:
        created = datetime.fromisoformat(str(record["created_at"]))
    except (KeyError, ValueError):
        return "undated"
    if created.tzinfo is not None:
        created = created.astimezone(timezone.utc)
    return created.strftime("%Y/%m/%d")


def image_key(box_id: str, user_id: str, record: dict[str, Any], image_format: str) -> str:
    """The image's key; `image_format` is "jpeg", "png" or "webp"."""
    return f"{box_id}/images/{user_id}/{_day(record)}/{record['image_id']}{IMAGE_FORMATS[image_format].suffix}"


def image_record_key(box_id: str, user_id: str, record: dict[str, Any]) -> str:
    """The image record's key, beside its image."""
    return f"{box_id}/images/{user_id}/{_day(record)}/{record['image_id']}.json"


def case_key(box_id: str, user_id: str, case_id: str) -> str:
    """The case record's key."""
    return f"{box_id}/cases/{user_id}/{case_id}.json"
