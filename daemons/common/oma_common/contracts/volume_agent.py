"""volume-agent's wire contract (its handlers: volume_agent/api.py; omad's client: clients/volume_agent.py)."""

from __future__ import annotations

import dataclasses

from ..schema import any_case, spec

MAX_PATHS = 256  # files per lock, unlock or status request
MAX_SESSIONS = 1024  # tunnel sessions per terminate request (a VMA holds one or two; omad sends more in batches)

# --- requests ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class MountIn:
    """A share to mount: NFS `server:export_path`, or CIFS `//server/share_name` with a login."""

    kind: str = spec(pattern=any_case("nfs", "cifs", "smb"), description="nfs, or cifs (smb), any letter case")
    server: str = spec(min_length=1, max_length=255)
    mount_point: str = spec(min_length=2, max_length=4096, description="absolute path below the agent's mount root")
    export_path: str = spec("", max_length=4096, description="NFS: the exported path")
    share_name: str = spec("", max_length=255, description="CIFS: the share")
    options: list[str] | str = spec(factory=list, description="extra mount options (a list, or comma-separated)")
    username: str = spec("", max_length=255)
    password: str = spec("", max_length=1024)
    domain: str = spec("", max_length=255)


@dataclasses.dataclass
class UnmountIn:
    mount_point: str = spec(min_length=2, max_length=4096)


@dataclasses.dataclass
class PathsIn:
    """Files of backup repositories (absolute, below a configured repository root)."""

    paths: list[str] = spec(min_length=1, max_length=MAX_PATHS, item={"maxLength": 4096},
                            description="absolute paths of regular files")


# --- answers ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Mounted:
    mount_point: str
    source: str
    type: str
    mounted: bool
    already_mounted: bool
    message: str


@dataclasses.dataclass
class Unmounted:
    mount_point: str
    unmounted: bool
    message: str
    source: str | None = None


@dataclasses.dataclass
class ShareMount:
    mount_point: str
    source: str
    type: str


@dataclasses.dataclass
class ShareMounts:
    """The mount root and the shares mounted below it."""

    mount_root: str
    mounts: list[ShareMount]


@dataclasses.dataclass
class Locked:
    paths: list[str]
    immutable: bool


@dataclasses.dataclass
class LockStatus:
    immutable: dict[str, bool] = spec(description="path → whether it is immutable")


# -- POST /tunnels/terminate: end a revoked VMA's sshd sessions --------------------------------------------


@dataclasses.dataclass
class SessionIn:
    pid: int = spec(min=2, description="sshd's per-connection monitor process")
    start_time: float = spec(min=0, description="its start time (psutil create_time), against pid reuse")


@dataclasses.dataclass
class TerminateIn:
    sessions: list[SessionIn] = spec(max_length=MAX_SESSIONS,
                                     description="the sessions that logged in with a revoked key")


@dataclasses.dataclass
class SkippedSession:
    pid: int
    reason: str


@dataclasses.dataclass
class Terminated:
    terminated: list[int] = spec(description="pids of the sessions ended")
    skipped: list[SkippedSession] = spec(description="sessions left alone, each with the reason")
