"""Copy one store into another through the Store API: `appliance migrate-store`.

Generic over the Store protocol, so any registered back end is a source or a
target. Idempotent and resumable: an image whose id the target already holds
is skipped (a save is atomic, so an interrupted copy never leaves half an
image), a case record the target holds unchanged is skipped and any other is
upserted as `cases.log_case` does (its record kept as the source has it,
`created_at` and `image_ids` included), and each case-id counter is raised to
the source's, never lowered. Users go one by one, each kind oldest first, so
listings keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..contract import SUFFIXES
from ..errors import ApplianceError
from ..imaging import sniff
from . import Store, StoredImage
from . import records as R


@dataclass
class MigrateReport:
    """What a copy wrote, found already there, and could not copy."""

    users: int = 0
    images: int = 0  # copied, each with its image record
    images_present: int = 0
    cases: int = 0  # case/uncertain/reject records copied (only where the target has none of that case id)
    cases_present: int = 0
    counters: int = 0  # raised
    counters_present: int = 0  # already as high
    problems: list[str] = field(default_factory=list)

    @property
    def copied(self) -> int:
        return self.images + self.cases + self.counters

    @property
    def present(self) -> int:
        return self.images_present + self.cases_present + self.counters_present

    def summary(self) -> str:
        """One line of counts: copied, already there, per kind."""
        return (
            f"users {self.users}; {self.copied} copied, {self.present} already there; images {self.images} "
            f"copied, {self.images_present} already there; case records {self.cases} copied, "
            f"{self.cases_present} already there; counters {self.counters} raised, {self.counters_present} "
            f"already as high; {len(self.problems)} not copied"
        )


def migrate(source: Store, target: Store) -> MigrateReport:
    """Copy every user's images, case records and counter from `source` into `target`."""
    report = MigrateReport()
    for user_id in source.users():
        report.users += 1
        _copy_images(source, target, user_id, report)
        _copy_cases(source, target, user_id, report)
        _raise_counter(source, target, user_id, report)
    return report


def _copy_images(source: Store, target: Store, user_id: str, report: MigrateReport) -> None:
    for rec in source.list_images(user_id):
        image_id = str(rec["image_id"])
        if target.image_record(user_id, image_id) is not None:
            report.images_present += 1
            continue
        data = source.read_image(user_id, image_id)
        if data is None:  # removed since it was listed: nothing to copy
            continue
        try:
            suffix = SUFFIXES[sniff(data)]
        except ApplianceError:
            report.problems.append(f"user {user_id} image {image_id}: not a JPEG, PNG or WebP image; not copied")
            continue
        target.save_image(user_id, StoredImage(image_id, data, suffix), rec)
        report.images += 1


def _copy_cases(source: Store, target: Store, user_id: str, report: MigrateReport) -> None:
    with source.reading(user_id, f"reading the case records of user {user_id}") as records:
        # Oldest first, ties in write order: the target's write order then lists them as the source does.
        # A case id's records go together (an old server's root may hold several), placed at its last.
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(records.case_rows(), key=lambda row: row.order):
            rec = row.load()
            case_id = str(rec["case_id"])
            groups[case_id] = [*groups.pop(case_id, []), rec]
    for case_id, recs in groups.items():
        with target.writing(user_id, f"copying case {case_id}") as records:
            held = records.cases(case_id)
            if held:
                # The target's record wins: it may carry edits made since an earlier run, or be
                # another box's case under the same id. Never overwrite an acknowledged write.
                if [row.record for row in held] == recs:
                    report.cases_present += len(recs)
                else:
                    report.problems.append(f"user {user_id} case {case_id}: the target already holds a different "
                                           "record of this case; kept the target's")
                continue
            # log_case's insert, minus its take-over: the copied image records already carry it.
            for rec in recs:
                records.add_case(R.case_record(rec))
                records.enqueue("case", case_id, len(R.dumps(rec)))
        report.cases += len(recs)


def _raise_counter(source: Store, target: Store, user_id: str, report: MigrateReport) -> None:
    with source.reading(user_id, f"reading the case counter of user {user_id}") as records:
        last = records.counter()
    if last is None:
        return
    with target.writing(user_id, f"raising the case counter of user {user_id}") as records:
        held = records.counter()
        if held is not None and held >= last:
            report.counters_present += 1
            return
        records.set_counter(last)
    report.counters += 1

