"""Object keys: deterministic, dated by the record, under a stable box id."""

from __future__ import annotations

import socket
from pathlib import Path

from appliance.sync import keys


def test_keys_are_deterministic_and_dated_by_the_record() -> None:
    record = {"image_id": "abc", "created_at": "2026-03-01T23:30:00-02:00"}
    assert keys.image_key("b", "user001", record, "jpeg") == "b/images/user001/2026/03/02/abc.jpg"
    assert keys.image_record_key("b", "user001", record) == "b/images/user001/2026/03/02/abc.json"
    assert keys.image_key("b", "user001", {"image_id": "abc"}, "png") == "b/images/user001/undated/abc.png"
    assert keys.case_key("b", "user001", "10000") == "b/cases/user001/10000.json"


def test_two_users_images_with_one_id_never_share_a_key() -> None:
    # Imported legacy image ids are free-form, so two users can hold the same one (issue 13).
    record = {"image_id": "IMG_0001", "created_at": "2026-03-01T10:00:00+00:00"}
    assert keys.image_key("b", "alice", record, "jpeg") != keys.image_key("b", "bob", record, "jpeg")
    assert keys.image_record_key("b", "alice", record) != keys.image_record_key("b", "bob", record)


def test_default_box_id_is_the_host_name_and_machine_id(tmp_path: Path) -> None:
    machine = tmp_path / "machine-id"
    machine.write_text("0123abcd" + "0" * 24 + "\n")
    host = socket.gethostname().split(".")[0]
    assert keys.default_box_id(machine).endswith("-0123abcd")
    assert keys.default_box_id(tmp_path / "missing").startswith(host[:3] if host.isalnum() else "")
    assert keys.default_box_id(machine) == keys.default_box_id(machine)
