"""omad's options: typed defaults, each with its comment; drop-ins in /usr/lib/oma/omad.d and /etc/oma/omad.d."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from oma_common.schema import spec


@dataclasses.dataclass
class ApiConfig:
    """The HTTP API."""

    listen_address: str = spec("127.0.0.1", description="address the API listens on")
    port: int = spec(8082, min=0, max=65535, description="TCP port of the API; 0 = pick a free one")
    max_body_bytes: int = spec(1024 * 1024, min=1024, description="largest request body accepted (413 above)")
    cors_origins: list[str] = spec(factory=lambda: ["*"], description="origins the GUI may call from; "
                                                                      "'*' = any (bearer tokens, no cookies)")
    shutdown_grace_seconds: float = spec(10.0, min=0, description="how long running requests may finish "
                                                                  "after a stop signal")


@dataclasses.dataclass
class AuthConfig:
    """Sessions and logins."""

    session_ttl_seconds: int = spec(8 * 3600, min=60, description="lifetime of a login session")
    login_failure_limit: int = spec(5, min=1, description="failed logins from one address before a 429")
    login_failure_window_seconds: int = spec(300, min=1, description="window the failures are counted in")


@dataclasses.dataclass
class AgentsConfig:
    """The root agents' sockets."""

    nbd_pool_socket: str = spec("", description="nbd-pool's socket; empty = <run_dir>/nbd-pool.sock")
    restore_mounter_socket: str = spec("", description="restore-mounter's socket; empty = <run_dir>/"
                                                       "restore-mounter.sock")
    volume_agent_socket: str = spec("", description="volume-agent's socket; empty = <run_dir>/volume-agent.sock")
    timeout_seconds: float = spec(30.0, min=0.1, description="default time limit of one agent call")
    health_timeout_seconds: float = spec(2.0, min=0.1, description="time limit of an agent health probe")


@dataclasses.dataclass
class VmaConfig:
    """The VMA (source-side appliance), reached through its SSH tunnel."""

    url: str = spec("http://127.0.0.1:9081", pattern=r"https?://[^/\s]+/?",
                    description="base URL of the VMA's API (its tunnel's local end); /api/v1 is added")
    timeout_seconds: float = spec(30.0, min=0.1, description="time limit of one VMA call")
    discover_timeout_seconds: float = spec(120.0, min=0.1, description="time limit of a discovery (the VMA "
                                                                       "walks the whole vCenter)")
    connect_timeout_seconds: float = spec(5.0, min=0.1, description="time limit to open a connection")
    retries: int = spec(2, min=0, max=10, description="extra attempts of an idempotent call after a "
                                                      "connection failure (never after a timeout)")
    retry_delay_seconds: float = spec(0.5, min=0, description="pause before the first retry; doubles after")


@dataclasses.dataclass
class VCenterConfig:
    """Direct vCenter calls (credential tests)."""

    test_timeout_seconds: float = spec(15.0, min=0.5, description="time limit of a credential test login")
    verify_tls: bool = spec(False, description="check vCenter certificates; most vCenters serve self-signed "
                                               "ones, and the VMA does not check them either")
    ca_file: str = spec("", description="PEM file of CAs to trust when verify_tls is on; empty = the system's")


@dataclasses.dataclass
class BackupConfig:
    """VM backups into QCOW2 chains on backup repositories."""

    nbd_host: str = spec("127.0.0.1", description="host the VMA reaches the exports at (its SSH tunnel's far end "
                                                   "forwards the pool's ports to this appliance's loopback)")
    shared_connections: int = spec(10, min=5, max=100, description="NBD clients each export accepts at once; "
                                                                   "the VMA opens 2 per disk")
    idle_timeout_seconds: float = spec(900.0, min=1, description="a running backup fails when none of its exports "
                                                                 "has had a client, and the VMA has sent neither "
                                                                 "telemetry nor a completion, for this long")
    watchdog_interval_seconds: float = spec(15.0, min=0.05, description="how often running backups are checked "
                                                                        "for idleness and their port leases renewed")
    lease_seconds: int = spec(3600, min=10, description="lease asked for on a backup's NBD ports; renewed while "
                                                        "the backup runs")
    qemu_img_timeout_seconds: float = spec(120.0, min=1, description="time limit of one qemu-img call")
    repository_min_free_bytes: int = spec(1024**3, min=0, description="a new repository needs this much free "
                                                                     "space for omad's user (0 = not checked)")
    check_images: bool = spec(True, description="run `qemu-img check` on every image when a backup completes "
                                                "(a corrupt image fails the backup)")


@dataclasses.dataclass
class PolicyConfig:
    """Backup policies: copies, retention and verification."""

    copy_attempts: int = spec(3, min=1, max=20, description="tries of one copy before it is marked failed")
    copy_backoff_seconds: float = spec(5.0, min=0, description="wait before the 2nd try; doubled for each next one")
    copy_interval_seconds: float = spec(3600.0, min=1, description="how often scheduled copy rules copy the "
                                                                 "backups their destination lacks")
    file_timeout_seconds: float = spec(6 * 3600.0, min=1, description="time limit of copying or hashing one image")
    retention_interval_seconds: float = spec(3600.0, min=1, description="how often enabled policies are pruned")
    verify_interval_seconds: float = spec(6 * 3600.0, min=1, description="how often stale backups are verified")
    reverify_after_hours: float = spec(7 * 24.0, min=0, description="a backup is verified again after this long")


@dataclasses.dataclass
class SchedulerConfig:
    """The scheduler that runs schedules inside omad."""

    poll_seconds: float = spec(5.0, min=0.1, description="how often the jobs of running executions are checked")
    late_after_seconds: float = spec(60.0, min=0, description="a run that starts this long after its due time "
                                                              "(omad was down or busy) is recorded as late")
    idle_seconds: float = spec(60.0, min=1, description="longest sleep with nothing due; bounds how long a step "
                                                        "of the system clock goes unnoticed")


@dataclasses.dataclass
class Config:
    """omad's configuration."""

    log_level: str = spec("INFO", description="DEBUG, INFO, WARNING or ERROR")
    state_dir: str = spec("/var/lib/oma", description="omad's persistent state (database, keys, admin-password)")
    run_dir: str = spec("/run/oma", description="runtime directory where the agents' sockets live")
    database: str = spec("", description="SQLite database file; empty = <state_dir>/oma.db")
    api: ApiConfig = spec(factory=ApiConfig, description="the HTTP API")
    auth: AuthConfig = spec(factory=AuthConfig, description="sessions and logins")
    agents: AgentsConfig = spec(factory=AgentsConfig, description="the root agents")
    secret_key_file: str = spec("", description="key that seals stored secrets; empty = <state_dir>/secret.key")
    vma: VmaConfig = spec(factory=VmaConfig, description="the VMA")
    vcenter: VCenterConfig = spec(factory=VCenterConfig, description="direct vCenter calls")
    backup: BackupConfig = spec(factory=BackupConfig, description="VM backups")
    policies: PolicyConfig = spec(factory=PolicyConfig, description="backup policies, copies, retention, verification")
    scheduler: SchedulerConfig = spec(factory=SchedulerConfig, description="the scheduler")

    @property
    def database_path(self) -> Path:
        return Path(self.database) if self.database else Path(self.state_dir) / "oma.db"

    @property
    def secret_key_path(self) -> Path:
        return Path(self.secret_key_file) if self.secret_key_file else Path(self.state_dir) / "secret.key"

    def agent_socket(self, name: str) -> Path:
        configured = {"nbd-pool": self.agents.nbd_pool_socket, "restore-mounter": self.agents.restore_mounter_socket,
                      "volume-agent": self.agents.volume_agent_socket}[name]
        return Path(configured) if configured else Path(self.run_dir) / f"{name}.sock"
