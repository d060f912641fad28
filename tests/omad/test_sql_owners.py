"""omad's SQL lives in store/: the folders already moved there hold none (more join this list as they move),
and the job statuses are written by store/jobs.py alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

OMAD = Path(__file__).resolve().parents[2] / "daemons" / "omad" / "omad"
MOVED = ["jobs", "schedule"]  # folders whose tables have their owner in store/
SQL = re.compile(r"\b(SELECT\s+[\w*(]|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+TABLE)\b")


@pytest.mark.parametrize("folder", MOVED)
def test_moved_folders_hold_no_sql(folder: str) -> None:
    found = [f"{p.relative_to(OMAD)}:{n}" for p in sorted((OMAD / folder).rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if SQL.search(line)]
    assert found == []


def test_job_statuses_are_written_by_their_owner_only() -> None:
    writes = re.compile(r"UPDATE\s+(jobs|job_steps)\s+SET\b[^\"']*\bstatus\s*=|INSERT\s+INTO\s+(jobs|job_steps)\b")
    found = sorted(str(p.relative_to(OMAD)) for p in OMAD.rglob("*.py") if writes.search(p.read_text()))
    assert found == ["store/jobs.py"]
