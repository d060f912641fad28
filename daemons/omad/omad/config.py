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
    verify_tls: bool = spec(True, description="check vCenter certificates against the CA store when the "
                                              "credential pins none (a self-signed vCenter: pin its thumbprint "
                                              "on the credential); false accepts any unpinned certificate")
    ca_file: str = spec("", description="PEM file of CAs to trust when verify_tls is on; empty = the system's")


@dataclasses.dataclass
class CloudStackConfig:
    """omad's CloudStack calls (settings, resources, network mappings)."""

    timeout_seconds: float = spec(15.0, min=0.5, description="time limit of one CloudStack API request")
    job_timeout_seconds: float = spec(600.0, min=1, description="time limit of one async CloudStack job")
    poll_interval_seconds: float = spec(2.0, min=0.01, description="pause between two queryAsyncJobResult calls")
    verify_tls: bool = spec(True, description="check the management server's certificate on https URLs")


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
class ReplicationConfig:
    """Replication of VMware disks into CloudStack volumes, written by the VMA over NBD."""

    nbd_host: str = spec("127.0.0.1", description="host the VMA reaches the exports at (its SSH tunnel's far end)")
    shared_connections: int = spec(10, min=5, max=100, description="NBD clients each export accepts at once; "
                                                                   "the VMA opens 2 per disk")
    lease_seconds: int = spec(3600, min=10, description="lease asked for on a replication's NBD ports; renewed "
                                                        "while it runs")
    poll_interval_seconds: float = spec(5.0, min=0.01, description="how often a running replication asks the VMA "
                                                                   "for its progress")
    idle_timeout_seconds: float = spec(900.0, min=1, description="a running replication fails when the VMA's "
                                                                 "progress has not moved, no change id came and no "
                                                                 "NBD client is connected for this long")
    volume_headroom_bytes: int = spec(5 * 1024**3, min=0, description="a disk's volume is its capacity plus this")
    oma_url: str = spec("", description="the URL the VMA calls back (change ids); empty = http://127.0.0.1:<the "
                                        "API's port>, where the VMA's tunnel lands")


@dataclasses.dataclass
class FailoverConfig:
    """Failover jobs (test, live, end of a test, rollback)."""

    crash_file: str = spec("", description="fault injection for tests: when this file names a step (or "
                                           "`replication:vma`: a replication's start, before the VMA is asked), "
                                           "omad dies (SIGKILL) right there, once; empty = off")
    log_files: list[str] = spec(factory=list, description="log files GET /debug/logs reads; empty = "
                                                          "<state_dir>/logs/*.log when that directory exists "
                                                          "(make run), else the journal of the daemons' units")


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
    start_concurrency: int = spec(4, min=1, max=64, description="jobs of scheduled runs started at once, across "
                                                            "every schedule (a replication's start creates and "
                                                            "attaches its volumes: seconds each)")


@dataclasses.dataclass
class EnrollmentConfig:
    """VMA enrollment and the VMA's SSH tunnel account."""

    tunnel_user: str = spec("vma_tunnel", min_length=1, max_length=32,
                            description="user an approved VMA key logs in as (sshd); an unauthenticated call to the "
                                        "VMA's machine routes is accepted only from a loopback socket it owns")
    nbd_port_first: int = spec(10100, min=1, max=65535, description="first NBD port the tunnel may forward to "
                                                                    "(nbd-pool's port range)")
    nbd_port_last: int = spec(10200, min=1, max=65535, description="last NBD port the tunnel may forward to")
    ssh_host_key: str = spec("/etc/ssh/ssh_host_ed25519_key.pub",
                             description="sshd's host public key; its fingerprint is handed to approved VMAs")
    challenge_ttl_seconds: int = spec(300, min=10, description="time the VMA has to answer its challenge")
    approval_ttl_seconds: int = spec(7 * 86400, min=60, description="a verified enrollment not approved or "
                                                                    "rejected within this time expires")
    max_code_ttl_seconds: int = spec(86400, min=60, description="longest validity an administrator may give a "
                                                               "pairing code")
    rate_limit: int = spec(120, min=1, description="public enrollment calls accepted from one address per window "
                                                   "(the VMA polls its result while it waits for approval)")
    rate_window_seconds: int = spec(60, min=1, description="window the public calls are counted in")
    failure_limit: int = spec(5, min=1, description="wrong pairing codes or signatures from one address "
                                                    "before a 429")
    failure_window_seconds: int = spec(300, min=1, description="window the failures are counted in")


@dataclasses.dataclass
class Config:
    """omad's configuration."""

    log_level: str = spec("INFO", description="DEBUG, INFO, WARNING or ERROR")
    state_dir: str = spec("/var/lib/oma", description="omad's persistent state (database, keys, admin-password)")
    run_dir: str = spec("/run/oma", description="runtime directory where the agents' sockets live")
    database: str = spec("", description="SQLite database file; empty = <state_dir>/oma.db")
    database_busy_timeout_seconds: float = spec(5.0, min=0.01, max=600, description="how long a database write "
                                                "waits for another process's lock before the request answers 503 "
                                                "database_busy")
    state_min_free_bytes: int = spec(64 * 1024**2, min=0, description="GET /health is degraded while the file "
                                     "system holding state_dir has less free space than this for omad "
                                     "(0 = only once a database write was refused for lack of space)")
    api: ApiConfig = spec(factory=ApiConfig, description="the HTTP API")
    auth: AuthConfig = spec(factory=AuthConfig, description="sessions and logins")
    agents: AgentsConfig = spec(factory=AgentsConfig, description="the root agents")
    secret_key_file: str = spec("", description="key that seals stored secrets; empty = <state_dir>/secret.key")
    vma: VmaConfig = spec(factory=VmaConfig, description="the VMA")
    vcenter: VCenterConfig = spec(factory=VCenterConfig, description="direct vCenter calls")
    cloudstack: CloudStackConfig = spec(factory=CloudStackConfig, description="CloudStack API calls")
    backup: BackupConfig = spec(factory=BackupConfig, description="VM backups")
    replication: ReplicationConfig = spec(factory=ReplicationConfig, description="replication into CloudStack")
    failover: FailoverConfig = spec(factory=FailoverConfig, description="failover jobs")
    policies: PolicyConfig = spec(factory=PolicyConfig, description="backup policies, copies, retention, verification")
    scheduler: SchedulerConfig = spec(factory=SchedulerConfig, description="the scheduler")
    enrollment: EnrollmentConfig = spec(factory=EnrollmentConfig, description="VMA enrollment and its SSH tunnel")

    @property
    def database_path(self) -> Path:
        return Path(self.database) if self.database else Path(self.state_dir) / "oma.db"

    @property
    def secret_key_path(self) -> Path:
        return Path(self.secret_key_file) if self.secret_key_file else Path(self.state_dir) / "secret.key"

    def api_base_url(self) -> str:
        """Where omad answers: the URL it recorded at start (port 0 picks one), else the configured address."""
        url_file = Path(self.state_dir) / "omad.url"
        if url_file.exists():
            return url_file.read_text().strip()
        host = self.api.listen_address if self.api.listen_address not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.api.port}"

    def agent_socket(self, name: str) -> Path:
        configured = {"nbd-pool": self.agents.nbd_pool_socket, "restore-mounter": self.agents.restore_mounter_socket,
                      "volume-agent": self.agents.volume_agent_socket}[name]
        return Path(configured) if configured else Path(self.run_dir) / f"{name}.sock"
