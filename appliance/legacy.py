"""Import the old back end's storage root (plain or encrypted) into the configured store.

The old layout (see the client contract) is per-user folders holding
`<image_id>.jpg` (or `.bin` when encrypted), `metadata.jsonl` (image records,
and case records carrying `entry_type`) and `case_counter.json`. Everything goes
through the Store API, so the target can be either back end, encrypted or not.

Idempotent: images whose id the target already holds are skipped, case records
are imported only for cases the target does not have (the target's copy, maybe
updated since, wins), and counters are only ever raised. Every line or file
that cannot be read is reported as `path:line: why`, never skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import privacy
from .cases import list_cases, log_case, raise_case_counter
from .contract import SUFFIXES
from .errors import ApplianceError, StoreError
from .imaging import sniff
from .storage import CASE_ENTRY_TYPES, Store, StoredImage
from .storage.crypto import (
    MissingKey, Sealer, envelope_bytes, image_binding, is_sealed_record, load_sealer, read_key_file,
)

# The disk store writes the old layout: its names are the old layout's names.
# (The old server wrote .jpg, or .bin when encrypted; the disk store also .png and .webp.)
from .storage.disk import COUNTER, FILE_SUFFIXES, METADATA
from .storage.files import is_id


@dataclass
class ImportReport:
    """What an import read, wrote and skipped, and every line or file it could not read."""

    users: int = 0
    images: int = 0  # imported, each with its image record
    images_present: int = 0
    case_records: int = 0
    case_records_present: int = 0
    counters: int = 0  # raised
    counters_present: int = 0  # already at least as high
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts."""
        return (
            f"users {self.users}; images {self.images} imported, {self.images_present} already present; "
            f"image records {self.images}; case records {self.case_records} imported, "
            f"{self.case_records_present} already present; counters {self.counters} raised, "
            f"{self.counters_present} already as high; {len(self.problems)} unreadable"
        )


def source_sealer(key_file: Path | None, config_key_file: Path | None, environ: Mapping[str, str] | None = None) -> Sealer:
    """The old store's key: `--key-file`, else DATA_ENCRYPTION_KEY and the configured sources; none is fine."""
    if key_file is not None:
        return Sealer(read_key_file(key_file, "--key-file"), "--key-file")
    try:
        return load_sealer(True, config_key_file, environ)
    except MissingKey:
        return Sealer(None)


def import_legacy(source: Path, store: Store, *, sealer: Sealer, strip_metadata: bool = True) -> ImportReport:
    """Copy an old storage root into `store`; StoreError (nothing written) when its key is missing or wrong."""
    source = Path(source)
    if not source.is_dir():
        raise StoreError(f"import: {source} is not a directory")
    users = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    _check_key(users, sealer, source)
    report = ImportReport()
    for user_dir in users:
        if not is_id(user_dir.name):
            report.problems.append(f"{user_dir}: not a user id (A-Z a-z 0-9 _ -); folder not imported")
            continue
        report.users += 1
        _import_user(user_dir, store, sealer, strip_metadata, report)
    return report


def _check_key(users: list[Path], sealer: Sealer, source: Path) -> None:
    """Try the key on the first encrypted line or file, so a wrong key fails before anything is written."""
    for user_dir in users:
        sample: tuple[str, bytes, bytes | None] | None = None
        for n, raw in enumerate(_lines(user_dir / METADATA), 1):
            sealed = envelope_bytes(raw, user_dir.name)
            if sealed is not None:
                sample = (f"{user_dir / METADATA}:{n}", *sealed)
                break
        if sample is None:
            encrypted = sorted(user_dir.glob("*.bin"))
            if encrypted:
                path = encrypted[0]
                sample = (str(path), path.read_bytes(), image_binding(user_dir.name, path.stem))
        if sample is None:
            continue
        where, blob, ad = sample
        if not sealer.enabled:
            raise StoreError(
                f"import: {source} holds encrypted data ({where}); give its key with --key-file or DATA_ENCRYPTION_KEY"
            )
        try:
            sealer.unseal(blob, where, ad)
        except StoreError:
            raise StoreError(f"import: {sealer.source} does not decrypt {where}: wrong key?") from None
        return


def _lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []


def _read_records(
    user_dir: Path, sealer: Sealer, report: ImportReport
) -> tuple[dict[str, tuple[dict[str, Any], str]], dict[str, dict[str, Any]]]:
    """Image records by image id and case records by case id; later lines replace earlier ones."""
    path = user_dir / METADATA
    images: dict[str, tuple[dict[str, Any], str]] = {}
    cases: dict[str, dict[str, Any]] = {}
    for n, raw in enumerate(_lines(path), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(raw)
        except ValueError as e:
            report.problems.append(f"{where}: not JSON ({getattr(e, 'msg', e)})")
            continue
        if is_sealed_record(rec):
            try:
                rec = sealer.open_envelope(rec, where, user_dir.name)
            except StoreError:
                report.problems.append(f"{where}: does not decrypt (damaged, or written with another key)")
                continue
        if not isinstance(rec, dict):
            report.problems.append(f"{where}: not a JSON object")
            continue
        if "entry_type" in rec:
            if rec["entry_type"] not in CASE_ENTRY_TYPES:
                report.problems.append(f"{where}: unknown entry_type {rec['entry_type']!r}")
            elif rec.get("case_id") in (None, ""):
                report.problems.append(f"{where}: case record without case_id")
            else:
                case_id = str(rec["case_id"])
                cases.pop(case_id, None)  # an upsert: the later record takes the later place
                cases[case_id] = rec
        elif is_id(rec.get("image_id")):
            images.pop(rec["image_id"], None)
            images[rec["image_id"]] = (rec, where)
        else:
            report.problems.append(f"{where}: image record without a valid image_id")
    return images, cases


def _import_user(user_dir: Path, store: Store, sealer: Sealer, strip_metadata: bool, report: ImportReport) -> None:
    user_id = user_dir.name
    images, cases = _read_records(user_dir, sealer, report)
    files = {p.stem: p for p in sorted(user_dir.iterdir()) if p.suffix in FILE_SUFFIXES and p.is_file()}
    present = {rec.get("image_id") for rec in store.list_images(user_id)}
    for image_id, (rec, where) in images.items():
        if image_id in present:
            report.images_present += 1
            continue
        path = files.get(image_id)
        if path is None:
            report.problems.append(f"{where}: image {image_id} has no image file; not imported")
            continue
        image = _read_image(path, user_id, sealer, strip_metadata, report)
        if image is None:
            continue
        try:
            store.save_image(user_id, image, rec)
        except ValueError as e:
            report.problems.append(f"{where}: {e}")
            continue
        report.images += 1
    for image_id, path in files.items():
        if image_id not in images:
            report.problems.append(f"{path}: no image record in {METADATA}; not imported")

    listed = list_cases(store, user_id, status=None, limit=2**62, include_uncertain=True, include_rejected=True)
    known = {str(rec.get("case_id")) for rec in listed}
    for case_id, rec in cases.items():
        if case_id in known:
            report.case_records_present += 1
            continue
        log_case(store, user_id, rec)
        report.case_records += 1

    _import_counter(user_dir / COUNTER, user_id, store, report)
    # A missing or stale case_counter.json must not let next-id hand out an id
    # the imported records already use: the counter also moves past every one.
    used = [int(c) for c in [*cases, *(str(rec.get("case_id")) for rec, _ in images.values())] if c.isdigit()]
    if used:
        raise_case_counter(store, user_id, max(used))


def _read_image(
    path: Path, user_id: str, sealer: Sealer, strip_metadata: bool, report: ImportReport
) -> StoredImage | None:
    data = path.read_bytes()
    if path.suffix == ".bin":
        try:
            data = sealer.unseal(data, str(path), image_binding(user_id, path.stem))
        except StoreError:
            report.problems.append(f"{path}: does not decrypt (damaged, or written with another key)")
            return None
    try:
        fmt = sniff(data)
    except ApplianceError:
        report.problems.append(f"{path}: not a JPEG, PNG or WebP image")
        return None
    if strip_metadata:
        try:
            data = privacy.strip_metadata(data, fmt)
        except privacy.MetadataError as e:
            report.problems.append(f"{path}: {e}")
            return None
    return StoredImage(image_id=path.stem, data=data, suffix=SUFFIXES[fmt])


def _import_counter(path: Path, user_id: str, store: Store, report: ImportReport) -> None:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return
    try:
        last = json.loads(text)["last_case_id"]
        if isinstance(last, bool) or not isinstance(last, int):
            raise TypeError(f"last_case_id is {last!r}")
    except (ValueError, TypeError, KeyError) as e:
        report.problems.append(f"{path}:1: expected {{\"last_case_id\": <integer>}} ({e})")
        return
    if raise_case_counter(store, user_id, last):
        report.counters += 1
    else:
        report.counters_present += 1
