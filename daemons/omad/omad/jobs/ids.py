"""Job identifiers in the shapes the clients in the field expect."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone


def job_id(now: datetime | None = None) -> str:
    """`job-YYYYMMDD-HHMMSS.mmm-xxxxxx` (CONTRACTS.md, replication jobs)."""
    now = now or datetime.now(timezone.utc)
    return f"job-{now:%Y%m%d-%H%M%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def context_id(vm_name: str, now: datetime | None = None) -> str:
    """`ctx-<vm>-YYYYMMDD-HHMMSS`."""
    now = now or datetime.now(timezone.utc)
    return f"ctx-{vm_name}-{now:%Y%m%d-%H%M%S}"
