"""Fixtures for nbd-pool's daemon tests: a free port range, the real daemon over its socket, and a check that a
test leaves no qemu process, loop device or mount behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ..rig import Stack
from .helpers import Agent, Pool, free_range, leftovers, pool_config


@pytest.fixture
def no_leftovers(short_tmp: Path) -> Iterator[range]:
    """A free port range for the test; afterwards nothing may remain that references the test's directory
    or listens in that range: qemu-nbd, qemu-storage-daemon, loop devices, FUSE or other mounts."""
    ports = free_range()
    yield ports
    left = leftovers(short_tmp, ports)
    assert not left, f"left behind: {left}"


@pytest_asyncio.fixture
async def make_pool(no_leftovers: range, stack_config: Stack) -> AsyncIterator[Any]:
    """Configure (extra TOML lines allowed) and start nbd-pool; releases everything through its API after the
    test, before the daemon stops (a stopping nbd-pool leaves its exports running on purpose)."""
    made: list[Pool] = []
    repo = stack_config.state / "repo"
    repo.mkdir(exist_ok=True)

    async def make(extra: str = "") -> Pool:
        stack_config.add_config("nbd-pool", "50-test.toml", pool_config(no_leftovers, repo, extra))
        pool = Pool(stack_config, no_leftovers, repo, Agent(stack_config.run_dir / "nbd-pool.sock"))
        await asyncio.to_thread(pool.start)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        try:
            if pool.daemon.running():
                await pool.clean_up()
        finally:
            await pool.agent.close()


@pytest_asyncio.fixture
async def pool(make_pool: Any) -> Pool:
    """nbd-pool with the default options on a free port range."""
    return await make_pool()  # type: ignore[no-any-return]
