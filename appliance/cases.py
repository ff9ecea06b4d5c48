"""The contract's case rules, written once over any store's primitives (storage/base.py).

Case ids are issued, claimed and released; case records are upserted (their
images taking over status and patient fields), updated and listed. Every
function is synchronous and blocking: services call them in the store's
single writer thread, never on the event loop.
"""

from __future__ import annotations

from typing import Any

from .storage import Store
from .storage import records as R
from .storage.base import CaseQuery, Records, Row


def next_case_id(store: Store, user_id: str) -> str:
    """Issue the user's next case id ("10000" first); never repeats, even across restarts."""
    with store.writing(user_id, "allocating a case id") as records:
        last = records.counter()
        # max(): a raised case_id_start takes effect; a lowered one never reissues ids.
        issued = store.case_id_start if last is None else max(last + 1, store.case_id_start)
        records.set_counter(issued)
    return str(issued)


def raise_case_counter(store: Store, user_id: str, at_least: int) -> bool:
    """Make the user's last issued case id at least `at_least` (never lower); True if it changed."""
    with store.writing(user_id, "raising a case counter") as records:
        last = records.counter()
        if last is not None and last >= at_least:
            return False
        records.set_counter(int(at_least))
    return True


def claim_case_id(store: Store, user_id: str, case_id: str | None) -> str:
    """The client's case id, with the counter moved past it so it is never issued again; else the next id."""
    if case_id is None:
        return next_case_id(store, user_id)
    raise_case_counter(store, user_id, int(case_id))
    return case_id


def release_case_id(store: Store, user_id: str, case_id: str) -> dict[str, Any]:
    """Give back the most recently issued id when no record uses it (the contract's answer body)."""
    with store.writing(user_id, "releasing a case id") as records:
        last = records.counter()
        if last is None:
            return {"status": "skipped", "reason": "missing_counter"}
        if int(case_id) != last:
            return {"status": "skipped", "reason": "counter_mismatch", "last_case_id": str(last)}
        # "010004" and "10004" name the same counter value: either spelling keeps it in use.
        if any(records.images(form) or records.cases(form) for form in R.case_id_forms(case_id)):
            return {"status": "skipped", "reason": "case_in_use"}
        records.set_counter(last - 1)
    return {"status": "ok", "case_id": case_id}


def log_case(store: Store, user_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """Upsert a case/uncertain/reject record by (user, case_id); its image records take it over."""
    rec = R.case_record(record)
    with store.writing(user_id, f"logging case {rec['case_id']}") as records:
        for old in records.cases(rec["case_id"]):
            records.delete_case(old)
        rec["image_ids"] = _take_over(records, rec)
        records.add_case(rec)
        _announce(records, rec)
    return rec


def update_case(store: Store, user_id: str, case_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    """Merge `fields` into the latest case/uncertain record of that id; None when there is none.

    `case_id`, `entry_type`, `user_id` and `image_ids` in `fields` are ignored;
    the record keeps its place in the listing order. Returns the stored record.
    """
    case_id = str(case_id)
    with store.writing(user_id, f"updating case {case_id}") as records:
        targets = [row for row in records.cases(case_id) if row.record["entry_type"] in R.UPDATABLE_ENTRY_TYPES]
        if not targets:
            return None
        rec = R.merge_update(targets[-1].record, fields)
        rec["image_ids"] = _take_over(records, rec)
        records.put_case(Row(targets[-1].key, rec))
        _announce(records, rec)
    return rec


def _take_over(records: Records, case: dict[str, Any]) -> list[str]:
    """Copy the case's status and non-empty patient fields into its image records; return their ids."""
    fields = R.takeover(case)
    images = records.images(case["case_id"])
    for row in images:
        records.put_image(Row(row.key, {**row.record, **fields}))
    return [row.record["image_id"] for row in images if row.record.get("image_id")]


def _announce(records: Records, case: dict[str, Any]) -> None:
    """Outbox jobs for a case record and the image records its take-over changed."""
    records.enqueue("case", case["case_id"], len(R.dumps(case)))
    # Each image record's own size: the sync budget counts every job (issue 13).
    for row in records.images(case["case_id"]):
        if row.record.get("image_id"):
            records.enqueue("image_record", row.record["image_id"], len(R.dumps(row.record)))


def list_cases(
    store: Store,
    user_id: str | None,
    *,
    status: str | None,
    limit: int | None,
    include_uncertain: bool,
    include_rejected: bool,
) -> list[dict[str, Any]]:
    """Case records newest first; user_id None means every user's (an admin's view).

    Ordered by `created_at` (ISO strings) descending, ties most recently
    written first; `status` matches case-insensitively; at most `limit` (None: all, the API's `limit=0`).
    """
    query = CaseQuery(R.listed_entry_types(include_uncertain, include_rejected),
                      None if status is None else R.status_key(status), None if limit is None else int(limit))
    with store.reading(user_id, "listing cases") as records:
        return [row.load() for row in records.case_rows(query)]
