"""Start-up reconciliation, before READY: re-adopt the mounts that are intact, keep the broken ones as broken,
remove everything else.

A recorded mount is re-adopted when it was fully mounted and still is: nbd-pool holds its attachment as
recorded and the process serving it is alive, every filesystem it mounted is at its mount point on the
recorded device, and each FUSE daemon is the same process (pid, start time, command line). Its idle time starts
again. A mount whose attachment nbd-pool still holds but reports broken (its process died, e.g. while we were
down) is kept as `broken` with the cause, for the user to see and unmount; never re-adopted as mounted.
Anything else it names is torn down.
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
from .attach import ATTACHED, BROKEN as ATTACHMENT_BROKEN, GONE, Health
from .mounts import Mount, MountManager
from .records import BROKEN, ERROR, MOUNTED, MountRecord

log = logging.getLogger(__name__)


ADOPT, KEEP_BROKEN, REMOVE = "adopt", "broken", "remove"


async def _attachments(manager: MountManager, records: list[MountRecord]) -> dict[str, Health] | None:
    """nbd-pool's word on every recorded attachment (one question), or None when it cannot be asked."""
    try:
        return await manager.attacher.health([r.attachment for r in records if r.attachment is not None])
    except errors.OmaError as e:
        # nbd-pool may be restarting too; the devices and mounts being in place is evidence enough.
        log.warning("cannot ask %s about the attachments (%s); judging by the devices", manager.attacher.name, e)
        return None


def _judge(r: MountRecord, attachments: dict[str, Health] | None) -> tuple[str, str]:
    """What to do with a recorded mount: adopt, keep as broken (with the cause), or remove."""
    if r.status not in (MOUNTED, BROKEN) or r.attachment is None or not r.mounted_filesystems:
        return REMOVE, ""
    if attachments is None:
        h = Health(ATTACHED) if os.path.exists(r.attachment.device) else Health(GONE)
    else:
        h = attachments.get(r.attachment.attachment_id, Health(GONE))
    if h.state == GONE:
        return REMOVE, ""
    if h.state == ATTACHMENT_BROKEN:
        return KEEP_BROKEN, h.cause
    if r.status == BROKEN:
        return KEEP_BROKEN, r.error  # broken by a FUSE daemon's death: that does not heal
    return (ADOPT, "") if _filesystems_intact(r) else (REMOVE, "")


def _filesystems_intact(r: MountRecord) -> bool:
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
    broken = 0
    attachments = await _attachments(manager, records)
    for r in records:
        verdict, cause = _judge(r, attachments)
        if verdict == REMOVE:
            dropped.append(r)
            continue
        m = Mount(r, manager.clock.monotonic(), manager.resolver)
        manager.mounts[r.mount_id] = m
        if verdict == KEEP_BROKEN:
            # Its filesystems stay mounted (unreadable) until DELETE or idle expiry removes it all.
            r.status, r.error = BROKEN, cause
            broken += 1
            log.warning("kept as broken, not re-adopted: %s", cause, extra=logs.tag(r.mount_id))
        else:
            m.open_roots()
            log.info("re-adopted %s (%s)", r.mount_id, r.image, extra=logs.tag(r.mount_id))
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
    summary = f"{len(manager.mounts) - broken} mount(s) re-adopted, {len(dropped)} removed"
    if broken:
        summary += f", {broken} broken (kept: unmount to remove)"
    if problems:
        summary += f"; left behind: {'; '.join(problems)}"
        log.error("reconciliation incomplete: %s", "; ".join(problems))
    log.info("reconciled: %s", summary)
    return summary
