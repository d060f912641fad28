"""nbd-pool's wire contract (its handlers: nbd_pool/api.py; omad's client: clients/nbdpool.py).

Job ids match JOB_ID, export names EXPORT_NAME; times are RFC 3339 (UTC).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..schema import spec

JOB_ID = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
EXPORT_NAME = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"

# --- requests ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class AllocateIn:
    job_id: str = spec(pattern=JOB_ID)
    count: int = spec(1, min=1, max=65535, description="ports to lease, all or none")
    export_names: list[str] | None = spec(None, description="one per port, in order (each matching the "
                                                             "export name rule)")
    lease_seconds: int | None = spec(None, min=1, description="lease length; default from the configuration")


@dataclasses.dataclass
class ReleaseIn:
    job_id: str | None = spec(None, pattern=JOB_ID)
    ports: list[int] | None = spec(None, description="these ports (of that job, when job_id is given too)")


@dataclasses.dataclass
class RenewIn:
    job_id: str = spec(pattern=JOB_ID)
    lease_seconds: int | None = spec(None, min=1)


@dataclasses.dataclass
class ExportIn:
    export_name: str = spec(pattern=EXPORT_NAME)
    port: int = spec(min=1, max=65535, description="a leased port of the pool")
    path: str = spec(min_length=1, max_length=4096, description="an image or block device inside an export root")
    format: Literal["qcow2", "raw"] | None = spec(None, description="default: raw for a block device, else qcow2")
    read_only: bool = False
    shared_connections: int = spec(10, min=5, max=1024, description="clients at once (the VMA opens 2 per export)")
    job_id: str | None = spec(None, pattern=JOB_ID, description="when given, the port must be leased to this job")


@dataclasses.dataclass
class StopIn:
    pid: int | None = spec(None, min=1)
    export_name: str | None = spec(None, pattern=EXPORT_NAME)


@dataclasses.dataclass
class AttachIn:
    image: str = spec(min_length=1, max_length=4096, description="a QCOW2 (or raw) file inside an export root")
    owner: str = spec(min_length=1, max_length=256, description="who holds it, e.g. restore-mounter:<mount id>")
    format: Literal["qcow2", "raw"] = "qcow2"


# --- answers ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class PortName:
    port: int
    export_name: str | None


@dataclasses.dataclass
class Allocated:
    job_id: str
    allocated_ports: list[PortName]
    expires_at: str
    lease_seconds: int


@dataclasses.dataclass
class Released:
    success: bool
    released_count: int
    released_ports: list[int]
    stopped_exports: int
    stopped_pids: list[int]


@dataclasses.dataclass
class Renewed:
    job_id: str
    expires_at: str
    ports: list[int]


@dataclasses.dataclass
class PortRange:
    min: int
    max: int


@dataclasses.dataclass
class Lease:
    port: int
    job_id: str
    export_name: str | None
    allocated_at: str
    expires_at: str


@dataclasses.dataclass
class PortStatus:
    total_ports: int
    allocated: int
    available: int
    port_range: PortRange
    foreign_ports: list[int] = spec(description="ports of the range that other processes hold")
    allocations: list[Lease] = spec(factory=list)


@dataclasses.dataclass
class Export:
    """A running (or exited) qemu-nbd export."""

    pid: int | None
    port: int
    export_name: str
    path: str
    qcow2_path: str = spec(description="the same as path (the spec's name for it)")
    resolved_path: str = spec(description="path with symlinks resolved")
    format: str = spec(description="qcow2 or raw")
    read_only: bool = False
    job_id: str | None = None
    bind_address: str = ""
    started_at: str | None = None
    uptime_seconds: float = 0.0
    connection_count: int = 0
    clients: list[str] = spec(factory=list)
    shared_limit: int = 0
    status: Literal["running", "exited"] = "running"
    size: int | None = spec(None, description="bytes of the image (the answer to POST /exports only)")


@dataclasses.dataclass
class ExportList:
    processes: list[Export]


@dataclasses.dataclass
class Stopped:
    success: bool
    stopped_pid: int | None


@dataclasses.dataclass
class RootsView:
    """Where images may be exported from (GET /roots)."""

    export_roots: list[str] = spec(description="as configured")
    resolved_roots: list[str] = spec(description="each with symlinks resolved")
    drop_in: str = spec(description="the drop-in files that change them (a glob)")
    key: str = spec(description="the setting in those files")


@dataclasses.dataclass
class Partition:
    number: int
    device: str  # /dev/loop0p1, /dev/nbd0p1
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID or MBR id ("0x83")
    name: str = ""  # GPT partition name


@dataclasses.dataclass
class Attachment:
    """An image attached read-only as a block device, with its partitions."""

    attachment_id: str
    owner: str
    image: str
    resolved_image: str
    format: str
    backend: Literal["kernel-nbd", "fuse-loop"]
    device: str
    partitions: list[Partition]
    attached_at: str | None
    # broken: the process serving the device has died (every read of the device fails); judged when asked,
    # not only by the periodic check. DELETE tears down what is left once nothing is mounted from it.
    status: Literal["attached", "broken"]
    pid: int | None
    error: str | None = spec(None, description="why it is broken (which process ended, and how)")


@dataclasses.dataclass
class AttachmentList:
    attachments: list[Attachment]
    max_attachments: int
    available_slots: int
    backend: str


@dataclasses.dataclass
class Success:
    success: bool
