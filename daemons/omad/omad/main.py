"""omad's entry point: args → config → logging → database → services → API → READY → serve → drain."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from oma_common import config, daemon, logs
from oma_common.daemon import StopSignal
from oma_common.notify import Notifier
from oma_common.web import REQUEST_LIMITS

from .adapters.localfs import LocalFs
from .adapters.qemu_img import QemuImg
from .api import app as api_app
from .api.auth import AuthApi
from .api.backups import BackupsApi
from .api.cloudstack import CloudStackApi
from .api.contexts import ContextsApi, VmsApi
from .api.credentials import CredentialsApi
from .api.discovery import DiscoveryApi
from .api.groups import GroupsApi
from .api.health import HealthApi
from .api.nbd import NbdApi
from .api.network_mappings import NetworkMappingsApi
from .api.policies import PoliciesApi
from .api.debug import DebugApi
from .api.failover import FailoverApi
from .api.validation import ValidationApi
from .api.replications import ReplicationsApi
from .api.repositories import RepositoriesApi
from .api.restore import RestoreApi
from .api.schedules import SchedulesApi
from .api.telemetry import TelemetryApi, receiver
from .api.vma import VmaEnrollmentApi
from .adapters.netlinks import local_nics
from .audit import Audit
from .auth.ratelimit import FailureLimiter
from .auth.service import AuthService
from .backup.backups import Backups
from .backup.chains import Chains
from .backup.completion import Completion, Telemetry
from .backup.copies import Copies, ScheduledCopies
from .backup.immutability import Immutability
from .backup.policies import Policies
from .backup.retention import Retention
from .backup.verify import Verifier
from .backup.repositories import ExportRoots, Repositories
from .backup.recovery import Recovery
from .backup.teardown import Teardown
from .backup.watchdog import Watchdog
from .replication.changeids import ChangeIds
from .replication.ending import Ending
from .replication.monitor import Monitor
from .failover.readiness import Readiness
from .failover.service import Failovers
from .failover.source import Source
from .replication.replications import Replications
from .replication.volume_creates import ContextlessCreates
from .restore.images import RepositoryImages
from .restore.service import RestoreService
from .clients.agents import Agents
from .clients.cloudstack import CloudStack, Limits
from .cloudstack.config import Configs
from .cloudstack.mappings import Mappings
from .cloudstack.networks import Networks
from .cloudstack.settings import Settings
from .clients.nbdpool import NbdPool
from .clients.restore_mounter import RestoreMounter
from .clients.vcenter import VCenter
from .clients.vma import VmaClient
from .clients.volume_agent import VolumeAgent
from .config import Config
from .crypto import SecretBox
from .health import Health, StateStorage
from .inventory.contexts import Contexts
from .inventory.credentials import Credentials
from .inventory.discovery import Discovery
from .inventory.vms import Vms
from .jobs.engine import JobEngine
from .jobs.locks import KeyedLocks
from .nbd_admin import NbdAdmin
from .schedule.clock import SystemClock
from .schedule.groups import Groups
from .schedule.launcher import BackupLauncher, JobLauncher, ReplicationLauncher
from .schedule.scheduler import Scheduler
from .schedule.schedules import Schedules
from .store.db import Database
from .vma.enrollment import Enrollments
from .vma.tunnel import TunnelPeers

log = logging.getLogger("omad")

# aiohttp 3.9 moved shutdown_timeout from the site to the runner. 3.8 (Debian 12) hands a runner's unknown
# keywords to every connection's handler, which then fails: each request would be reset unanswered.
_GRACE_ON_RUNNER = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters


class Background(Protocol):
    """A service with its own loop (a watchdog, the scheduler): started after recovery, stopped before the
    database closes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclasses.dataclass
class Omad:
    """Everything assemble() built that main() starts, serves and stops."""

    app: web.Application
    auth: AuthService
    jobs: JobEngine
    background: list[Background] = dataclasses.field(default_factory=list)
    replications: Replications | None = None
    # Before serving: reseal first-format secrets bound to their rows (each returns how many it resealed).
    reseals: list[Callable[[], Awaitable[int]]] = dataclasses.field(default_factory=list)


async def assemble(cfg: Config, db: Database, agents: Agents) -> Omad:
    """Build every service with its collaborators, and the application that serves them."""
    audit = Audit(db)
    jobs = JobEngine(db)
    auth = AuthService(db, audit, session_ttl=cfg.auth.session_ttl_seconds,
                       limiter=FailureLimiter(cfg.auth.login_failure_limit, cfg.auth.login_failure_window_seconds),
                       bootstrap_file=Path(cfg.state_dir) / "admin-password")
    box = SecretBox.from_key_file(cfg.secret_key_path)
    vma = VmaClient(cfg.vma)
    vcenter = VCenter(timeout=cfg.vcenter.test_timeout_seconds, verify_tls=cfg.vcenter.verify_tls,
                      ca_file=cfg.vcenter.ca_file)
    credentials = Credentials(db, audit, box, vcenter)
    contexts = Contexts(db)
    vms = Vms(db)
    discovery = Discovery(db, audit, credentials, vma, contexts, vms)
    pool = NbdPool(agents.nbd_pool)

    # CloudStack: saved configs, the setup flows, networks and the VMs' network mappings.
    cs_cfg = cfg.cloudstack
    cloudstack = CloudStack(Limits(timeout=cs_cfg.timeout_seconds, job_timeout=cs_cfg.job_timeout_seconds,
                                   poll_interval=cs_cfg.poll_interval_seconds, verify_tls=cs_cfg.verify_tls))
    ossea_configs = Configs(db, audit, box)
    networks = Networks(ossea_configs, cloudstack)
    cloudstack_api = CloudStackApi(ossea_configs, Settings(ossea_configs, cloudstack, local_nics), networks)
    mappings = Mappings(db, audit, networks)
    mappings_api = NetworkMappingsApi(mappings, networks)

    # Backups: repositories, VM-level backups, their completion and chains, the idle watchdog.
    locks = KeyedLocks()
    fs = LocalFs(timeout=cfg.backup.qemu_img_timeout_seconds)
    qemu_img = QemuImg(timeout=cfg.backup.qemu_img_timeout_seconds)
    volume_agent = VolumeAgent(agents.volume_agent)
    repositories = Repositories(db, audit, box, fs, volume_agent, ExportRoots(pool),
                                min_free_bytes=cfg.backup.repository_min_free_bytes)
    teardown = Teardown(db, jobs, pool, fs, locks)
    clock = SystemClock()
    immutability = Immutability(db, audit, volume_agent, fs, clock)
    backups = Backups(db, audit, jobs, locks, contexts, credentials, repositories, pool, vma, qemu_img, fs, teardown,
                      cfg.backup, immutability)
    completion = Completion(db, jobs, locks, contexts, qemu_img, fs, teardown, cfg.backup)
    jobs.on_recover("backup", Recovery(db, jobs, pool, vma, teardown, completion, cfg.backup).recover)

    # Replication: each disk into a CloudStack volume through volume-agent, exported by nbd-pool, written by the
    # VMA; followed by the monitor, which adopts running ones again after a restart.
    ending = Ending(db, jobs, pool, volume_agent, locks)
    replications = Replications(db, audit, jobs, locks, contexts, credentials, volume_agent, pool, vma, ending,
                                cfg.replication, cfg.failover.crash_file)
    monitor = Monitor(db, jobs, vma, pool, ending, cfg.replication, launching=replications.launching)
    replications.on_started.append(monitor.follow)
    change_ids = ChangeIds(db, locks)
    change_ids.on_all_stored.append(monitor.nudge)  # the VMA says Succeeded right after the last one
    contextless_creates = ContextlessCreates(db, volume_agent)  # volumes being created for a removed context
    jobs.on_recover("replication", monitor.recover)

    # Failover: test failover and its end, cleanup of failed ones — step jobs resumed or undone after a restart.
    failovers = Failovers(db, audit, jobs, ossea_configs, cloudstack, volume_agent, pool,
                          Source(db, vma, credentials, replications), cfg.failover.crash_file)
    jobs.on_recover("failover", failovers.recover)
    readiness = Readiness(db, ossea_configs, cloudstack, volume_agent, mappings)

    # Policies: copies of completed backups (immediate rules run on completion), locks, retention, verification.
    policies = Policies(db, audit)
    verifier = Verifier(db, jobs, qemu_img, fs, clock, cfg.policies)
    copies = Copies(db, audit, jobs, locks, qemu_img, fs, repositories, verifier, immutability, clock,
                    cfg.policies)
    retention = Retention(db, audit, backups, clock, interval_seconds=cfg.policies.retention_interval_seconds)
    scheduled_copies = ScheduledCopies(db, copies, clock, interval_seconds=cfg.policies.copy_interval_seconds)
    completion.on_completed += [immutability.lock_new, copies.after_backup]
    jobs.on_recover("backup_copy", copies.recover)
    watchdog = Watchdog(db, pool, teardown, cfg.backup)
    restore = RestoreService(db, audit, RestoreMounter(agents.restore_mounter), RepositoryImages(db))

    # Schedules: each run starts, per VM, a job through the same domain function the API uses.
    launchers: dict[str, JobLauncher] = {"backup": BackupLauncher(backups, jobs, repositories),
                                         "replication": ReplicationLauncher(replications, db)}
    scheduler = Scheduler(db, audit, launchers, SystemClock(), poll_seconds=cfg.scheduler.poll_seconds,
                          late_after_seconds=cfg.scheduler.late_after_seconds, idle_seconds=cfg.scheduler.idle_seconds,
                          stop_grace_seconds=cfg.api.shutdown_grace_seconds,
                          start_concurrency=cfg.scheduler.start_concurrency)
    schedules = Schedules(db, audit, scheduler.clock, launchers, on_change=scheduler.wake,
                          disabling=scheduler.disabling)
    groups = Groups(db, audit, on_change=scheduler.wake)

    # VMA enrollment: approved keys reach sshd through `omactl vma authorized-keys`; volume-agent ends the sshd
    # sessions of a revoked key.
    enrollments = Enrollments.from_config(cfg, db, audit, volume_agent)

    storage = StateStorage(Path(cfg.state_dir), db, LocalFs(timeout=cfg.agents.health_timeout_seconds),
                           cfg.state_min_free_bytes)
    health = Health(db, agents, storage, watchers=[restore.health_seen])
    apis: list[Any] = [HealthApi(health), AuthApi(auth), CredentialsApi(credentials), DiscoveryApi(discovery),
            ContextsApi(contexts), VmsApi(vms), NbdApi(NbdAdmin(pool, audit)), RepositoriesApi(repositories),
            BackupsApi(backups, completion, Chains(db, contexts)),
            TelemetryApi({"backup": receiver(Telemetry, completion.telemetry),
                          "replication": receiver(Telemetry, monitor.telemetry)}), RestoreApi(restore),
            SchedulesApi(schedules, scheduler), GroupsApi(groups),
            PoliciesApi(policies, retention, copies, verifier, immutability), cloudstack_api, mappings_api,
            VmaEnrollmentApi(enrollments), ReplicationsApi(replications, change_ids),
            FailoverApi(failovers, readiness), ValidationApi(readiness)]
    apis.append(DebugApi(health, failovers, lambda: api_app.specs(apis), log_files(cfg)))
    app = api_app.build(apis, auth, tunnel=TunnelPeers(cfg.enrollment.tunnel_user), cors_origins=cfg.api.cors_origins,
                        max_body=cfg.api.max_body_bytes)

    async def close_clients(app: web.Application) -> None:
        await vma.close()
        vcenter.close()

    app.on_cleanup.append(close_clients)
    return Omad(app, auth, jobs, background=[watchdog, restore, scheduler, retention, verifier,
                                            scheduled_copies, monitor, contextless_creates],
                replications=replications,
                reseals=[credentials.reseal_unbound, ossea_configs.reseal_unbound, repositories.reseal_unbound])


def log_files(cfg: Config) -> list[Path]:
    """What GET /debug/logs reads: the configured files, else make run's log directory; [] = the journal."""
    if cfg.failover.log_files:
        return [Path(p) for p in cfg.failover.log_files]
    logs = Path(cfg.state_dir) / "logs"
    return sorted(logs.glob("*.log")) if logs.is_dir() else []


def write_url(path: Path, url: str) -> None:
    """Where omactl finds an omad started on port 0; not worth failing the start over."""
    try:
        path.write_text(url + "\n")
    except OSError as e:
        log.warning("cannot record the API URL in %s: %s", path, e)


async def amain() -> int:
    args = config.arg_parser("omad", "the OMA API daemon").parse_args()
    cfg = config.load_from_args(Config, "omad", args)
    if args.show_config:
        print(config.dump(cfg))
        return 0
    logs.setup("omad", args.log_level or cfg.log_level)
    notifier = Notifier()
    stop = StopSignal()

    db = Database(cfg.database_path, busy_timeout=cfg.database_busy_timeout_seconds)
    await db.open()
    agents = Agents(cfg)
    runner: web.AppRunner | None = None
    omad: Omad | None = None
    started: list[Background] = []
    try:
        await db.migrate()
        omad = await assemble(cfg, db, agents)
        password_file = Path(cfg.state_dir) / "admin-password"
        password = await omad.auth.bootstrap(password_file)
        if password:
            log.warning("created the administrator 'admin'; its password is in %s", password_file)
            print(f"omad: first start: user 'admin', password {password} (also in {password_file})", flush=True)
        for reseal in omad.reseals:
            await reseal()
        recovered = await omad.jobs.recover()  # before serving: no request sees a job a dead omad left
        if recovered:
            log.warning("recovered %d job(s) left active by the previous run", recovered)
        for service in omad.background:
            await service.start()
            started.append(service)
        grace: dict[str, Any] = {"shutdown_timeout": cfg.api.shutdown_grace_seconds}
        runner = web.AppRunner(omad.app, handle_signals=False, access_log=None, **REQUEST_LIMITS,
                               **(grace if _GRACE_ON_RUNNER else {}))
        await runner.setup()
        site = web.TCPSite(runner, cfg.api.listen_address, cfg.api.port, reuse_address=True,
                           **({} if _GRACE_ON_RUNNER else grace))
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("listening on %s", url)
        write_url(Path(cfg.state_dir) / "omad.url", url)
        if omad.replications is not None and not cfg.replication.oma_url:
            omad.replications.oma_url = f"http://127.0.0.1:{port}"  # where the VMA's tunnel lands
        # What is built by now lives as long as omad: out of the collector's full passes, which otherwise walk
        # the ~90,000 objects of the imports alone (35 ms, a stall every request in flight waits out).
        gc.collect()
        gc.freeze()
        notifier.ready(f"listening on {url}")
        await stop.wait()
        notifier.stopping()
    finally:
        if runner is not None:
            await runner.cleanup()  # stops accepting, lets running requests finish within the grace period
        for service in reversed(started):
            await service.stop()
        if omad is not None:
            await omad.jobs.drain(cfg.api.shutdown_grace_seconds)
        await agents.close()
        await db.close()
        log.info("stopped")
    return 0


def main() -> None:
    daemon.run(amain)
