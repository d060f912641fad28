"""Session checks (required tools), the `root` marker, and the fixtures that start the real daemons."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .rig import Api, Stack, make_stack
from .sim.cloudstack import CloudStackSim, running

# tool → Debian package that provides it
REQUIRED_TOOLS = {
    "qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils", "qemu-io": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common", "nbdcopy": "libnbd-bin", "nbdinfo": "libnbd-bin",
    "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs", "mkfs.xfs": "xfsprogs",
    "mkntfs": "ntfs-3g", "ntfs-3g": "ntfs-3g", "fusefat": "fusefat", "mcopy": "mtools",
    "mkfs.vfat": "dosfstools", "partx": "util-linux", "losetup": "util-linux", "ip": "iproute2",
    "systemd-analyze": "systemd",
}


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = {tool: pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None}
    if missing:
        pytest.exit(f"tools the suite needs are missing ({', '.join(sorted(missing))}); install them with:\n"
                    f"  apt-get install --no-install-recommends {' '.join(sorted(set(missing.values())))}",
                    returncode=1)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (mounts, loop devices, namespaces or other users' uids)")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: unix socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="oma-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cloudstack_sim(short_tmp: Path) -> Iterator[CloudStackSim]:
    """A CloudStack simulator on its own thread and a free 127.0.0.1 port (`sim.endpoint`, `sim.api_key`,
    `sim.secret_key`); volumes attached to `sim.appliance_vm_id` appear as loop devices linked from
    `<short_tmp>/by-id` (root needed for that). Every loop device it made is released afterwards."""
    with running(short_tmp / "cloudstack", short_tmp / "by-id") as sim:
        yield sim


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[Stack]:
    """All four daemons, fresh state, omad on a free port; stopped after the test."""
    s = make_stack(short_tmp)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def stack_config(short_tmp: Path) -> Iterator[Stack]:
    """A stack's configuration, not yet started: add drop-ins, then call start()."""
    s = make_stack(short_tmp)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def shared_stack() -> Iterator[Stack]:
    """All four daemons, started once for a module's tests that change nothing: reads, and requests omad
    refuses. A test that creates, changes or logs in (other than through `shared_admin`) uses `stack`."""
    d = Path(tempfile.mkdtemp(prefix="oma-", dir="/tmp"))
    s = make_stack(d)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_admin_token(shared_stack: Stack) -> str:
    """One administrator session for the module (each login is an argon2 check)."""
    body = json.dumps({"username": "admin", "password": shared_stack.admin_password}).encode()
    req = urllib.request.Request(f"{shared_stack.url}/api/v1/auth/login", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        token: str = json.load(r)["session_token"]
    return token


@pytest.fixture
async def shared_admin(shared_stack: Stack, shared_admin_token: str) -> AsyncIterator[Api]:
    """A client of `shared_stack`, as the administrator."""
    async with Api(shared_stack.url, shared_admin_token) as api:
        yield api


@pytest.fixture
async def shared_anon(shared_stack: Stack) -> AsyncIterator[Api]:
    """A client of `shared_stack` without credentials."""
    async with Api(shared_stack.url) as api:
        yield api


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[Api]:
    """A client logged in as the bootstrap administrator."""
    api = Api(stack.url)
    await api.login("admin", stack.admin_password)
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
async def anon(stack: Stack) -> AsyncIterator[Api]:
    api = Api(stack.url)
    try:
        yield api
    finally:
        await api.close()
