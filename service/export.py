"""Export: the reviewed images as a training set, a folder per diagnosis and a CSV of what was
written. Run again into the same folder, it brings it up to date (a changed diagnosis moves the
image); every file is written under a temporary name and renamed into place."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import reviews
from melanoscreen.text import csv_cell

#: Where a `refer` verdict that names no diagnosis goes: not one of the nine classes, so
#: training skips it unless told to count it as melanoma (`train --suspected-as-melanoma`).
SUSPECTED = "melanoma-suspected"
#: The export's table of what it wrote, one row per exported image.
EXPORT_CSV = "reviewed.csv"
EXPORT_COLUMNS = ("sha256", "source", "verdict", "diagnosis", "reviewer", "date", "file")


@dataclass(frozen=True)
class Export:
    """What `export_reviewed` wrote."""

    table: Path  # the CSV
    written: int  # images, one row each in the CSV
    by_folder: dict[str, int] = field(default_factory=dict)  # folder (diagnosis) -> images
    skipped: dict[str, int] = field(default_factory=dict)  # why -> images


def export_reviewed(sessions: sessionmaker[Session], folder: Path) -> Export:
    """Write every image whose latest review names a diagnosis (or refers it) into `folder`:
    `<diagnosis>/<sha256><suffix>`, plus `reviewed.csv` with a row per image written."""
    from model.data import ISIC_CLASSES

    with sessions.begin() as session:
        reviewed = reviews.reviewed_images(session)
        latest = reviews.latest_reviews(session, [image.id for image in reviewed])
        found = [(image.sha256, image.source, image.location, latest[image.id])
                 for image in reviewed if image.id in latest]
    folder.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    rows = []
    for sha256, source, location, review in found:
        diagnosis = review.diagnosis if review.diagnosis in ISIC_CLASSES else None
        if diagnosis is not None:
            kind = diagnosis
        elif review.verdict.value == "refer":
            kind = SUSPECTED
        else:
            skipped[f"{review.verdict.value} without a diagnosis"] += 1
            continue
        stored = Path(location)
        if not stored.is_file():
            skipped["file missing from the store"] += 1
            continue
        target = folder / kind / f"{sha256}{stored.suffix.lower()}"
        target.parent.mkdir(exist_ok=True)
        if not target.exists():
            partial = target.with_name(f".{target.name}.part")
            shutil.copyfile(stored, partial)
            partial.replace(target)
        # A later review that changed the diagnosis: the image lives in one folder only.
        for other in folder.glob(f"*/{sha256}.*"):
            if other != target:
                other.unlink()
        counts[kind] += 1
        rows.append({"sha256": sha256, "source": source, "verdict": review.verdict.value,
                     "diagnosis": review.diagnosis or "", "reviewer": review.reviewer,
                     "date": review.created_at.isoformat(),
                     "file": str(target.relative_to(folder))})
    table = folder / EXPORT_CSV
    partial_table = table.with_name(f".{table.name}.part")
    with partial_table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(EXPORT_COLUMNS))
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    partial_table.replace(table)
    return Export(table, len(rows), dict(counts), dict(skipped))
