"""The disk store's own layout: the old server's folders, torn lines, unreadable lines, counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.cases import log_case, next_case_id
from appliance.errors import StoreError
from appliance.storage import Store, open_store

from . import stores
from .stores import JPEG, USER, case_record, image_bytes, listed, save

# The store root, and the disk store on it (tests/stores.py).
root = stores.root
disk_store = stores.store_of("disk")


# -- the disk layout ------------------------------------------------------------


def metadata_lines(root: Path, user: str = USER) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / user / "metadata.jsonl").read_text().splitlines()]


def test_disk_writes_the_old_servers_layout(disk_store: Store, root: Path) -> None:
    for _ in range(3):
        next_case_id(disk_store, USER)
    save(disk_store, "img-1", "10000")
    save(disk_store, "img-2", "10001", data=image_bytes("PNG"), suffix=".png")
    log_case(disk_store, USER, case_record("10000"))
    assert json.loads((root / USER / "case_counter.json").read_text()) == {"last_case_id": 10002}
    assert (root / USER / "img-1.jpg").read_bytes() == JPEG
    assert (root / USER / "img-2.png").read_bytes() == image_bytes("PNG")
    lines = metadata_lines(root)
    assert ["entry_type" in line for line in lines] == [False, False, True]
    assert lines[2]["image_ids"] == ["img-1"]
    assert sorted(p.name for p in root.iterdir()) == [".lock", USER]


def test_disk_cuts_a_torn_last_line_and_removes_its_orphan_image(disk_store: Store, root: Path) -> None:
    save(disk_store, "img-1", "10000")
    log_case(disk_store, USER, case_record("10000"))
    disk_store.close()
    # What a crash mid-append leaves: the image file landed, its line half-written.
    (root / USER / "img-2.jpg").write_bytes(JPEG)
    intact = (root / USER / "metadata.jsonl").read_bytes()
    with open(root / USER / "metadata.jsonl", "ab") as f:
        f.write(b'{"case_id": "10000", "image_id": "img-2", "blur')
    store = open_store("disk", root)
    try:
        assert (root / USER / "metadata.jsonl").read_bytes() == intact
        assert not (root / USER / "img-2.jpg").exists()
        assert [r["image_id"] for r in store.list_images(USER)] == ["img-1"]
        save(store, "img-3", "10000")
        assert [r.get("image_id") for r in metadata_lines(root)] == ["img-1", None, "img-3"]
    finally:
        store.close()


def test_disk_ignores_a_torn_last_line_on_read(disk_store: Store, root: Path) -> None:
    save(disk_store, "img-1", "10000")
    with open(root / USER / "metadata.jsonl", "ab") as f:
        f.write(b'{"entry_type": "case", "case_id": "10000", "crea')
    assert [r["image_id"] for r in disk_store.list_images(USER)] == ["img-1"]
    assert listed(disk_store) == []
    save(disk_store, "img-2", "10000")  # appends after cutting the torn tail
    assert [r["image_id"] for r in metadata_lines(root)] == ["img-1", "img-2"]


def test_disk_keeps_lines_it_cannot_read_and_their_images(root: Path) -> None:
    user_dir = root / USER
    user_dir.mkdir(parents=True)
    damaged = b'{"image_id": "old-image", "case_id": "1\x00\x00\x00'  # a whole line, but not JSON
    (user_dir / "metadata.jsonl").write_bytes(damaged + b"\n")
    (user_dir / "old-image.jpg").write_bytes(JPEG)
    store = open_store("disk", root)
    try:
        assert (user_dir / "old-image.jpg").exists()
        log_case(store, USER, case_record("10000"))
        assert (user_dir / "metadata.jsonl").read_bytes().splitlines()[0] == damaged
        assert store.list_images(USER) == []
        assert listed(store) == [("10000", "case")]
    finally:
        store.close()


def test_disk_refuses_an_unreadable_counter(disk_store: Store, root: Path) -> None:
    (root / USER).mkdir()
    (root / USER / "case_counter.json").write_text("{\"last")
    with pytest.raises(StoreError, match="case_counter.json"):
        next_case_id(disk_store, USER)


def test_disk_reads_a_counter_written_by_the_old_server(disk_store: Store, root: Path) -> None:
    (root / USER).mkdir()
    (root / USER / "case_counter.json").write_text('{"last_case_id": 10041}')
    assert next_case_id(disk_store, USER) == "10042"
