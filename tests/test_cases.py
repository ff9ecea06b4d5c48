"""The contract's case rules (appliance/cases.py), run over every store in BACKENDS.

Case ids (issue, claim, release and its answers), case-record upserts with
their images' take-over, updates and listings must answer the same whichever
back end holds the records.
"""

from __future__ import annotations

import threading

import pytest

from appliance.cases import (
    list_cases,
    log_case,
    next_case_id,
    release_case_id,
    update_case,
)
from appliance.storage import Store

from . import stores
from .stores import (
    OTHER,
    USER,
    Factory,
    case_record,
    image_record,
    listed,
    reopen,
    save,
)

# The store fixtures, parametrized over storage.BACKENDS (tests/stores.py).
backend, root, make_store, store = stores.backend, stores.root, stores.make_store, stores.store


# -- case ids -------------------------------------------------------------------


def test_first_case_id_is_case_id_start(store: Store) -> None:
    assert next_case_id(store, USER) == "10000"


def test_case_ids_count_up(store: Store) -> None:
    assert [next_case_id(store, USER) for _ in range(3)] == ["10000", "10001", "10002"]


def test_case_id_start_is_configurable(make_store: Factory) -> None:
    assert next_case_id(make_store(case_id_start=500), USER) == "500"


def test_case_id_counters_are_per_user(store: Store) -> None:
    next_case_id(store, USER)
    next_case_id(store, USER)
    assert next_case_id(store, OTHER) == "10000"
    assert next_case_id(store, USER) == "10002"


def test_release_gives_back_the_last_id(store: Store) -> None:
    next_case_id(store, USER)
    assert next_case_id(store, USER) == "10001"
    assert release_case_id(store, USER, "10001") == {"status": "ok", "case_id": "10001"}
    assert next_case_id(store, USER) == "10001"


def test_release_of_an_older_id_is_a_counter_mismatch(store: Store) -> None:
    next_case_id(store, USER)
    next_case_id(store, USER)
    assert release_case_id(store, USER, "10000") == {
        "status": "skipped", "reason": "counter_mismatch", "last_case_id": "10001"}
    assert next_case_id(store, USER) == "10002"


def test_release_of_an_id_with_an_image_is_in_use(store: Store) -> None:
    case_id = next_case_id(store, USER)
    save(store, "img-1", case_id)
    assert release_case_id(store, USER, case_id) == {"status": "skipped", "reason": "case_in_use"}
    assert next_case_id(store, USER) == "10001"


@pytest.mark.parametrize("entry_type", ["case", "uncertain", "reject"])
def test_release_of_an_id_with_a_case_record_is_in_use(store: Store, entry_type: str) -> None:
    case_id = next_case_id(store, USER)
    log_case(store, USER, case_record(case_id, entry_type))
    assert release_case_id(store, USER, case_id) == {"status": "skipped", "reason": "case_in_use"}


def test_release_ignores_other_users_records(store: Store) -> None:
    case_id = next_case_id(store, USER)
    save(store, "img-1", case_id, user=OTHER)
    assert release_case_id(store, USER, case_id)["status"] == "ok"


def test_release_without_a_counter_is_missing_counter(store: Store) -> None:
    assert release_case_id(store, USER, "10000") == {"status": "skipped", "reason": "missing_counter"}


def test_case_ids_and_releases_survive_reopen(store: Store, make_store: Factory) -> None:
    for _ in range(3):
        next_case_id(store, USER)
    release_case_id(store, USER, "10002")
    store = reopen(store, make_store)
    assert next_case_id(store, USER) == "10002"
    assert next_case_id(store, USER) == "10003"


def test_concurrent_allocations_are_all_distinct(store: Store) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def allocate() -> None:
        try:
            barrier.wait()
            mine = [next_case_id(store, USER) for _ in range(25)]
            results.extend(mine)
        except BaseException as e:  # surfaced below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=int) == [str(n) for n in range(10000, 10200)]


# -- case records ---------------------------------------------------------------


def test_log_case_returns_the_stored_record_with_image_ids_and_unknown_keys(store: Store) -> None:
    save(store, "img-1", "10000")
    save(store, "img-x", "10001")
    save(store, "img-2", "10000")
    decisions = [{"image_id": "img-1", "decision": "keep"}]
    stored = log_case(store, USER, case_record("10000", status="Confirmed", image_decisions=decisions))
    assert stored == case_record("10000", status="Confirmed", image_decisions=decisions, image_ids=["img-1", "img-2"])
    assert list_cases(store, USER, status=None, limit=10, include_uncertain=True, include_rejected=True) == [stored]


def test_log_case_upserts_by_user_and_case_id(store: Store) -> None:
    log_case(store, USER, case_record("10000", status="pending"))
    log_case(store, USER, case_record("10001"))
    log_case(store, OTHER, case_record("10000", user_id=OTHER))
    log_case(store, USER, case_record("10000", "uncertain"))
    log_case(store, USER, case_record("10000", "reject", reason="blurry"))
    mine = list_cases(store, USER, status=None, limit=10, include_uncertain=True, include_rejected=True)
    assert [(r["case_id"], r["entry_type"]) for r in mine] == [("10000", "reject"), ("10001", "case")]
    assert mine[0]["reason"] == "blurry"
    theirs = list_cases(store, OTHER, status=None, limit=10, include_uncertain=True, include_rejected=True)
    assert [(r["case_id"], r["entry_type"]) for r in theirs] == [("10000", "case")]
    assert store.stats()["cases"] == 3


def test_logged_case_fields_are_taken_over_by_its_images(store: Store) -> None:
    save(store, "img-1", "10000")
    save(store, "img-2", "10001")
    log_case(store, USER, case_record("10000", status="Confirmed", gender="female", age="42", location="back",
                                     symptoms=["itch"], notes="follow up"))
    first, other = store.list_images(USER)
    assert first == image_record(
        "img-1", "10000", case_status="Confirmed", case_entry_type="case",
        case_updated_at="2026-01-01T10:05:00+00:00", gender="female", age="42", location="back",
        symptoms=["itch"], notes="follow up")
    assert other == image_record("img-2", "10001")


def test_empty_case_fields_do_not_overwrite_image_fields(store: Store) -> None:
    save(store, "img-1", "10000")
    log_case(store, USER, case_record("10000", gender="male", age="50", symptoms=["bleeding"], notes="n1"))
    log_case(store, USER, case_record("10000", "uncertain", status="unsure", gender="", age=None, symptoms=[],
                                     notes="n2", updated_at="2026-01-02T09:00:00+00:00"))
    (rec,) = store.list_images(USER)
    assert (rec["gender"], rec["age"], rec["symptoms"], rec["notes"]) == ("male", "50", ["bleeding"], "n2")
    assert (rec["case_status"], rec["case_entry_type"], rec["case_updated_at"]) == (
        "unsure", "uncertain", "2026-01-02T09:00:00+00:00")
    assert "location" not in rec


def test_case_id_is_stored_as_a_string(store: Store) -> None:
    stored = log_case(store, USER, case_record(10000))  # type: ignore[arg-type]
    assert stored["case_id"] == "10000"


def test_log_case_needs_a_case_entry_type(store: Store) -> None:
    with pytest.raises(ValueError):
        log_case(store, USER, case_record("10000", entry_type="image"))


def test_update_case_merges_persists_and_propagates(store: Store, make_store: Factory) -> None:
    save(store, "img-1", "10000")
    log_case(store, USER, case_record("10000", status="pending", notes="first", extra_key=1))
    save(store, "img-2", "10000")
    updated = update_case(store, USER, "10000", {"status": "Confirmed", "age": "61",
                                                "updated_at": "2026-01-03T08:00:00+00:00"})
    assert updated == case_record("10000", status="Confirmed", notes="first", extra_key=1, age="61",
                                  updated_at="2026-01-03T08:00:00+00:00", image_ids=["img-1", "img-2"])
    store = reopen(store, make_store)
    assert list_cases(store, USER, status=None, limit=5, include_uncertain=True, include_rejected=True) == [updated]
    for rec in store.list_images(USER):
        assert (rec["case_status"], rec["case_updated_at"], rec["age"], rec["notes"]) == (
            "Confirmed", "2026-01-03T08:00:00+00:00", "61", "first")


def test_update_case_never_moves_a_record_to_another_case(store: Store) -> None:
    log_case(store, USER, case_record("10000"))
    updated = update_case(store, USER, "10000", {"case_id": "99999", "entry_type": "reject", "user_id": OTHER,
                                                "notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"})
    assert updated is not None
    assert (updated["case_id"], updated["entry_type"], updated["user_id"], updated["notes"]) == (
        "10000", "case", USER, "x")


def test_update_case_updates_an_uncertain_record(store: Store) -> None:
    log_case(store, USER, case_record("10000", "uncertain"))
    updated = update_case(store, USER, "10000", {"notes": "seen", "updated_at": "2026-01-03T08:00:00+00:00"})
    assert updated is not None and updated["entry_type"] == "uncertain" and updated["notes"] == "seen"


def test_update_case_never_updates_a_reject(store: Store) -> None:
    log_case(store, USER, case_record("10000", "reject"))
    assert update_case(store, USER, "10000", {"notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"}) is None
    (rec,) = list_cases(store, USER, status=None, limit=5, include_uncertain=True, include_rejected=True)
    assert "notes" not in rec


def test_update_case_of_an_unknown_case_is_none(store: Store) -> None:
    log_case(store, OTHER, case_record("10000", user_id=OTHER))
    assert update_case(store, USER, "10000", {"notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"}) is None
    assert update_case(store, USER, "10001", {"notes": "x", "updated_at": "2026-01-03T08:00:00+00:00"}) is None


@pytest.fixture
def cases(store: Store) -> Store:
    """A store with images and case records of two users at distinct and equal times."""
    save(store, "img-1", "10000")
    log_case(store, USER, case_record("10000", status="Confirmed", created_at="2026-01-01T09:00:00+00:00"))
    log_case(store, USER, case_record("10001", "uncertain", created_at="2026-01-03T09:00:00+00:00"))
    log_case(store, USER, case_record("10002", "reject", created_at="2026-01-02T09:00:00+00:00"))
    log_case(store, USER, case_record("10003", status="pending", created_at="2026-01-02T09:00:00+00:00"))
    log_case(store, OTHER, case_record("10000", user_id=OTHER, created_at="2026-01-04T09:00:00+00:00"))
    return store


def test_list_cases_is_newest_first_latest_written_first_on_ties(cases: Store) -> None:
    assert listed(cases) == [("10001", "uncertain"), ("10003", "case"), ("10002", "reject"), ("10000", "case")]


def test_list_cases_of_everyone_for_an_admin(cases: Store) -> None:
    assert listed(cases, None)[:2] == [("10000", "case"), ("10001", "uncertain")]
    assert len(listed(cases, None)) == 5


def test_list_cases_filters_by_entry_type(cases: Store) -> None:
    assert listed(cases, include_uncertain=False) == [("10003", "case"), ("10002", "reject"), ("10000", "case")]
    assert listed(cases, include_rejected=False) == [("10001", "uncertain"), ("10003", "case"), ("10000", "case")]
    assert listed(cases, include_uncertain=False, include_rejected=False) == [("10003", "case"), ("10000", "case")]


def test_list_cases_matches_status_case_insensitively(cases: Store) -> None:
    assert listed(cases, status="confirmed") == [("10000", "case")]
    assert listed(cases, status="PENDING") == [("10001", "uncertain"), ("10003", "case")]
    assert listed(cases, status="Rejected") == [("10002", "reject")]
    assert listed(cases, status="nothing") == []


def test_list_cases_stops_at_the_limit(cases: Store) -> None:
    assert listed(cases, limit=2) == [("10001", "uncertain"), ("10003", "case")]
    assert listed(cases, limit=0) == []


def test_list_cases_never_lists_image_records(store: Store) -> None:
    save(store, "img-1", "10000")
    assert listed(store) == []
    assert listed(store, None) == []
