"""Start-up reconciliation, before READY: re-adopt the mounts that are intact, remove everything else.

A recorded mount is re-adopted when it was fully mounted and still is: its attachment exists as recorded,
every filesystem it mounted is at its mount point on the recorded device, and each FUSE daemon is the same
process (pid, start time, command line). Its idle time starts again. Anything else it names is torn down.
Then whatever no record accounts for is removed: mounts under the mount root (innermost first), FUSE daemons
serving a path under it, our attachments (nbd-pool: by owner; local loops: by backing image), and the
empty directories left behind. Nothing outside the mount root and our attachments is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from oma_common import errors, logs, mountinfo

from .adapters import mounter
from .mounts import Mount, MountManager
from .records import ERROR, MOUNTED, MountRecord

log = logging.getLogger(__name__)


async def _intact(manager: MountManager, r: MountRecord) -> bool:
    if r.status != MOUNTED or r.attachment is None or not r.mounted_filesystems:
        return False
    try:
        if not await manager.attacher.intact(r.attachment):
            return False
    except errors.OmaError as e:
        # nbd-pool may be restarting too; the devices and mounts being in place is evidence enough.
        log.warning("cannot ask %s about %s (%s); judging by the device", manager.attacher.name,
                    r.attachment.attachment_id, e, extra=logs.tag(r.mount_id))
        if not os.path.exists(r.attachment.device):
            return False
    for fs in r.mounted_filesystems:
        entry = mountinfo.find(Path(fs.mount_point))
        if entry is None or not entry.read_only:
            return False
        if fs.fuse is not None:
            if not entry.is_fuse or not mounter.daemon_matches(fs.fuse):
                return False
        elif os.path.realpath(entry.source) != os.path.realpath(fs.device):
            return False
        try:
            os.stat(fs.mount_point)  # a FUSE mount whose daemon died answers ENOTCONN
        except OSError:
            return False
    return True


async def reconcile(manager: MountManager, records: list[MountRecord]) -> str:
    root = manager.mount_root
    dropped: list[MountRecord] = []
    for r in records:
        if await _intact(manager, r):
            m = Mount(r, manager.clock.monotonic(), manager.resolver)
            m.open_roots()
            manager.mounts[r.mount_id] = m
            log.info("re-adopted %s (%s)", r.mount_id, r.image, extra=logs.tag(r.mount_id))
        else:
            dropped.append(r)
    problems = []
    for r in dropped:
        with logs.resource(r.mount_id):
            log.warning("removing %s mount of %s left by the previous run", r.status, r.image)
            m = Mount(r, manager.clock.monotonic(), manager.resolver)
            try:
                await manager.tear_down(m)
            except Exception as e:
                # Kept as an "error" mount: it holds its slot, and DELETE or the next sweep retries.
                problems.append(f"{r.mount_id}: {e}")
                log.error("could not remove it all (%s); kept for retry", e)
                r.status, r.error = ERROR, f"left by the previous run, not fully removed: {e}"
                manager.mounts[r.mount_id] = m
    kept = [Path(m.record.mount_path) for m in manager.mounts.values()]

    def ours(p: Path) -> bool:
        return any(p == k or p.is_relative_to(k) for k in kept)

    strays: set[str] = set()  # devices mounted under the root by no mount we keep
    daemons = [d for d in mounter.fuse_daemons()
               if Path(d.mount_point).is_relative_to(root) and not ours(Path(d.mount_point))]
    strays.update(d.device for d in daemons)  # a fusefat mount does not name its device in mountinfo
    for entry in mountinfo.under(root):
        if not ours(entry.mount_point):
            strays.add(entry.source)
            log.warning("unmounting %s (%s): no mount tracks it", entry.mount_point, entry.fstype)
            try:
                await mounter.umount(entry.mount_point)
            except Exception as e:
                problems.append(f"{entry.mount_point}: {e}")
    for d in daemons:
        try:
            await mounter.stop_fuse_daemon(d)
        except Exception as e:
            problems.append(f"{d.program} pid {d.pid}: {e}")
    try:
        await manager.attacher.release_orphans({m.record.attachment.attachment_id for m in manager.mounts.values()
                                                if m.record.attachment},
                                               {r.image for r in dropped}, strays)
    except Exception as e:
        problems.append(f"attachments: {e}")
        log.error("could not release orphaned attachments: %s", e)
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.name not in manager.mounts and child.is_dir() and not child.is_symlink():
            for sub in child.iterdir():
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only empty directories: never remove anything that could be a mount's content
            with contextlib.suppress(OSError):
                child.rmdir()
    await manager.save()
    summary = f"{len(manager.mounts)} mount(s) re-adopted, {len(dropped)} removed"
    if problems:
        summary += f"; left behind: {'; '.join(problems)}"
        log.error("reconciliation incomplete: %s", "; ".join(problems))
    log.info("reconciled: %s", summary)
    return summary
