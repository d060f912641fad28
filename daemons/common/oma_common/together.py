"""Awaitables run at once, all of them ended before a failure is raised."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def every(*aws: Awaitable[T]) -> list[T]:
    """Their results in order, once every one has ended; else the first failure, also only once every one has
    ended (unlike asyncio.gather, which raises at once while the others go on: an undo or a lock released then
    would race them)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    return results  # type: ignore[return-value]  # no exception among them
