"""Network shares for backup repositories (NFS, CIFS/SMB), mounted for omad under one root it cannot write.

omad is unprivileged, so it asks for the mount; this agent decides what is safe to do as root:
- mount points live strictly below `mount_root` (root-owned; omad cannot plant a symlink there), never
  inside a share mounted there (the share's server controls what is below it), and are created here;
- the mount point is created and opened component by component with openat2(2) (no symlink, no other
  mount), and mount(8) is handed that descriptor (/proc/self/fd/N, --no-canonicalize), so what is mounted
  on is the directory that was checked, whatever happens to the path meanwhile;
- every mount is nosuid,nodev,noexec, and caller options may not loosen that or choose the owner;
- a CIFS share is owned by the caller (SO_PEERCRED uid/gid), its password travels in mount.cifs's
  environment (PASSWD), never in an argv that `ps` shows;
- mounting the same share on the same point again is a no-op; a different one there is a conflict;
- a mount leaves nothing mounted unless it answers success: mount(8) is never killed for a caller that went
  away (the kernel may have mounted already; its outcome would be unknown) but run to its end within the time
  limit (`run_to_end`), and after any failure, time-out or cancellation whatever is mounted on the point is
  unmounted (lazily: nothing can use a share nobody was told of, and a hung server must not hold the undo)
  before the point is removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

from oma_common import beneath
from oma_common.blocking import run_blocking, run_to_end
from oma_common.errors import Conflict, Invalid, Unavailable

from .adapters import mount as m

log = logging.getLogger("volume_agent.repositories")

KINDS = ("nfs", "cifs")
_OPTION = re.compile(r"[A-Za-z0-9_]+(=[A-Za-z0-9_.:/@+-]*)?")
_SERVER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*")
# Options that would undo nosuid/nodev/noexec, let users mount, or pick the files' owner or credentials.
_FORBIDDEN = {"suid", "dev", "exec", "defaults", "user", "users", "owner", "group", "remount", "bind", "rbind",
              "move", "uid", "gid", "forceuid", "forcegid", "username", "pass", "password", "password2",
              "credentials", "cred", "file_mode", "dir_mode", "setuids", "dynperm"}
FORCED = ("nosuid", "nodev", "noexec")


@dataclasses.dataclass
class Share:
    """What to mount where; exactly one of export_path (NFS) or share_name (CIFS) is used."""

    kind: str
    server: str
    mount_point: str
    export_path: str = ""
    share_name: str = ""
    options: list[str] = dataclasses.field(default_factory=list)
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)
    domain: str = ""


class RepositoryMounts:
    def __init__(self, mount_root: Path, *, timeout: float = 60.0, mount_program: str = "mount",
                 umount_program: str = "umount") -> None:
        self.root = Path(os.path.abspath(mount_root))
        self.timeout = timeout
        self.mount_program = mount_program
        self.umount_program = umount_program
        self._locks: dict[Path, asyncio.Lock] = {}

    # -- the calls -----------------------------------------------------------------------------------

    async def mount(self, share: Share, *, owner_uid: int, owner_gid: int) -> dict[str, Any]:
        kind = share.kind.lower()
        if kind not in KINDS:
            raise Invalid("unknown share type", f"type must be nfs or cifs, not {share.kind!r}")
        point = self.mount_point(share.mount_point)
        source = self._source(kind, share)
        options = self._options(kind, share, owner_uid, owner_gid)
        env = {"USER": share.username, "PASSWD": share.password} if kind == "cifs" else None
        async with self._lock(point):
            current = await asyncio.to_thread(self._outside_shares, point)
            if current is not None:
                if current.source == source and current.fstype.startswith(kind):
                    log.info("%s: %s already mounted", point, source, extra={"resource": str(point)})
                    return self._answer(point, source, kind, already=True)
                raise Conflict("mount point busy", f"{point} already has {current.source} ({current.fstype}) "
                                                   "mounted on it")
            created, fd = await run_blocking(self._make_point, point, undo=_unmake_point)
            try:
                argv = m.mount_argv(kind, source, beneath.fd_path(fd), options, program=self.mount_program)
                # To its end (bounded by the time limit) even when our caller goes away meanwhile.
                await run_to_end(m.mount(argv, env=env, timeout=self.timeout, pass_fds=(fd,)))
            except BaseException as e:
                # Leave nothing behind a failed, timed-out or abandoned mount: what got mounted, then the point.
                await run_to_end(self._leave_nothing(point, source, created))
                if isinstance(e, m.CommandFailed):
                    raise self._explain(kind, source, point, e) from e
                raise
            finally:
                os.close(fd)
        log.info("%s: mounted %s (%s)", point, source, kind, extra={"resource": str(point)})
        return self._answer(point, source, kind, already=False)

    async def unmount(self, mount_point: str) -> dict[str, Any]:
        point = self.mount_point(mount_point)
        async with self._lock(point):
            current = await asyncio.to_thread(self._outside_shares, point)
            if current is None:
                return {"mount_point": str(point), "unmounted": False, "message": "nothing was mounted there"}
            try:
                await m.umount(point, timeout=self.timeout, program=self.umount_program)
            except m.CommandFailed as e:
                said = e.stderr.strip() or str(e)
                if "busy" in said.lower():
                    raise Conflict("share in use", f"{point} is busy (files are open on it): {said}") from e
                raise Unavailable("unmount failed", f"umount {point}: {said}") from e
            await asyncio.to_thread(_rmdir_quietly, point)
        log.info("%s: unmounted %s", point, current.source, extra={"resource": str(point)})
        return {"mount_point": str(point), "unmounted": True, "source": current.source,
                "message": f"unmounted {current.source}"}

    async def listing(self) -> dict[str, Any]:
        mounts = [e for e in await asyncio.to_thread(m.read_mounts)
                  if e.mount_point != self.root and e.mount_point.is_relative_to(self.root)]
        return {"mount_root": str(self.root),
                "mounts": [{"mount_point": str(e.mount_point), "source": e.source, "type": e.fstype}
                           for e in mounts]}

    # -- rules ---------------------------------------------------------------------------------------

    def mount_point(self, text: str) -> Path:
        """An absolute, normalised path strictly below the mount root, without symlinks on the way."""
        if not text or not os.path.isabs(text):
            raise Invalid("bad mount point", f"mount point must be an absolute path, not {text!r}")
        if os.path.normpath(text) != text.rstrip("/") or "\n" in text or "\x00" in text:
            raise Invalid("bad mount point", f"mount point {text!r} is not a normalised path")
        point = Path(text)
        if point == self.root or not point.is_relative_to(self.root):
            raise Invalid("mount point outside the mount root",
                          f"{point} is not below {self.root}, the only place this agent mounts shares")
        here = self.root
        for part in point.relative_to(self.root).parts:
            here = here / part
            if here.is_symlink():
                raise Invalid("bad mount point", f"{here} is a symbolic link; refusing to mount through it")
        return point

    def _outside_shares(self, point: Path) -> m.MountEntry | None:
        """Refuse a point inside a share mounted below the root (its server decides what is there: a
        directory now may be a symlink to /etc at the mount); returns what is mounted at the point itself."""
        at = None
        for e in m.read_mounts():
            if e.mount_point == point:
                at = e
            elif e.mount_point != self.root and e.mount_point.is_relative_to(self.root) \
                    and point.is_relative_to(e.mount_point):
                raise Invalid("mount point inside a share", f"{point} is inside {e.mount_point}, where "
                                                            f"{e.source} is mounted; choose a point beside it")
        return at

    def _source(self, kind: str, share: Share) -> str:
        if not _SERVER.fullmatch(share.server or ""):
            raise Invalid("bad server", f"{share.server!r} is not a host name or address")
        if kind == "nfs":
            path = share.export_path
            if not path.startswith("/") or any(c in path for c in "\n\x00,") or ".." in path.split("/"):
                raise Invalid("bad export path", f"NFS export path must be absolute: {path!r}")
            return f"{share.server}:{path}"
        name = share.share_name.strip("/")
        if not name or any(c in name for c in "\n\x00,\\") or ".." in name.split("/"):
            raise Invalid("bad share name", f"{share.share_name!r} is not a CIFS share name")
        return f"//{share.server}/{name}"

    def _options(self, kind: str, share: Share, uid: int, gid: int) -> list[str]:
        out = list(FORCED)
        for opt in share.options:
            opt = opt.strip()
            if not opt:
                continue
            if not _OPTION.fullmatch(opt):
                raise Invalid("bad mount option", f"{opt!r} is not a mount option this agent accepts")
            if opt.split("=", 1)[0].lower() in _FORBIDDEN:
                raise Invalid("mount option not allowed", f"{opt!r} is chosen by the agent or would weaken "
                                                          "the mount (nosuid,nodev,noexec are always set)")
            out.append(opt)
        if kind == "cifs":
            if not share.username:
                raise Invalid("username required", "a CIFS share needs a username")
            if share.domain:
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,255}", share.domain):
                    raise Invalid("bad domain", f"{share.domain!r} is not a domain name")
                out.append(f"domain={share.domain}")
            # The caller (omad) owns the files: the repository must be writable by it.
            out += [f"uid={uid}", f"gid={gid}", "file_mode=0640", "dir_mode=0750"]
        return out

    def _explain(self, kind: str, source: str, point: Path, e: m.CommandFailed) -> Unavailable:
        said = " ".join(e.stderr.split()) or str(e)
        reasons = []
        if m.kernel_lacks(kind):
            reasons.append(f"this kernel ({os.uname().release}) has no {kind.upper()} client: '{kind}' is not in "
                           f"/proc/filesystems and no module provides it")
        package = m.helper_missing(kind)
        if package:
            reasons.append(f"the {m.HELPERS[kind][0]} helper is missing (install the {package} package)")
        why = "; ".join(reasons)
        log.warning("%s: mounting %s failed: %s%s", point, source, said, f" ({why})" if why else "",
                    extra={"resource": str(point)})
        return Unavailable(f"cannot mount the {kind.upper()} share",
                           f"mount {source} on {point} failed: {said}" + (f" — {why}" if why else ""),
                           kernel_support=not m.kernel_lacks(kind), helper_missing=package)

    # -- plumbing ------------------------------------------------------------------------------------

    async def _leave_nothing(self, point: Path, source: str, created: list[Path]) -> None:
        """After a mount that did not answer success (the lock on the point is held): unmount what is mounted
        on the point (nothing was before it, and mount(8) may have mounted before it failed, was killed at the
        time limit or its caller went away), then remove the directories made for it."""
        left = await asyncio.to_thread(m.mounted_at, point)
        if left is not None:
            log.warning("%s: the mount of %s did not succeed but left %s (%s) mounted; unmounting it", point,
                        source, left.source, left.fstype, extra={"resource": str(point)})
            try:
                await m.umount(point, timeout=self.timeout, program=self.umount_program, lazy=True)
            except m.CommandFailed as e:
                log.error("%s: could not unmount what the failed mount left: %s", point, e,
                          extra={"resource": str(point)})
                return
        await asyncio.to_thread(_remove_dirs, created)

    def _lock(self, point: Path) -> asyncio.Lock:
        return self._locks.setdefault(point, asyncio.Lock())

    def _make_point(self, point: Path) -> tuple[list[Path], int]:
        """Create the mount point (and directories on the way) and open it; returns the directories created
        here and an O_PATH descriptor of the point. Each step is openat2 beneath the previous directory with
        no symlink and no mount crossing, so the descriptor is of a directory on the root's own filesystem."""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._check_root()
        here = self.root
        created = []
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in point.relative_to(self.root).parts:
                here = here / part
                try:
                    os.mkdir(part, mode=0o755, dir_fd=fd)
                    created.append(here)
                except FileExistsError:
                    pass
                try:
                    nxt = beneath.openat2(fd, part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, beneath.STRICT)
                except OSError as e:
                    raise Invalid("bad mount point", f"{here} is not a directory on the mount root's own "
                                                     f"filesystem (a symlink or another mount?): {e.strerror}") from None
                os.close(fd)
                fd = nxt
        except BaseException:
            _unmake_point((created, fd))
            raise
        return created, fd

    def _check_root(self) -> None:
        """The root must be reached without symlinks and be writable by root alone: otherwise whoever can
        write there could steer a mount made as root onto another directory."""
        real = Path(os.path.realpath(self.root))
        if real != self.root:
            raise Unavailable("mount root unsafe", f"{self.root} resolves to {real}; configure the real path")
        st = self.root.stat()
        if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o022):
            raise Unavailable("mount root unsafe", f"{self.root} must be owned by root and writable by root alone "
                                                   f"(it is uid {st.st_uid}, mode {st.st_mode & 0o7777:o})")

    @staticmethod
    def _answer(point: Path, source: str, kind: str, *, already: bool) -> dict[str, Any]:
        return {"mount_point": str(point), "source": source, "type": kind, "mounted": True,
                "already_mounted": already,
                "message": f"{source} was already mounted" if already else f"mounted {source}"}


def _unmake_point(made: tuple[list[Path], int]) -> None:
    """Undo `_make_point` for a caller cancelled while it ran: close the descriptor, remove what it created."""
    created, fd = made
    os.close(fd)
    _remove_dirs(created)


def _remove_dirs(created: list[Path]) -> None:
    for directory in reversed(created):
        _rmdir_quietly(directory)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
