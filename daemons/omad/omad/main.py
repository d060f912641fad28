"""omad's entry point: args → config → logging → database → services → API → READY → serve → drain."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
from aiohttp import web

from oma_common import config, daemon, logs
from oma_common.daemon import StopSignal
from oma_common.notify import Notifier

from .api import app as api_app
from .api.auth import AuthApi
from .api.health import HealthApi
from .audit import Audit
from .auth.ratelimit import FailureLimiter
from .auth.service import AuthService
from .clients.agents import Agents
from .config import Config
from .health import Health
from .store.db import Database

log = logging.getLogger("omad")

_AIOHTTP = tuple(int(p) for p in aiohttp.__version__.split(".")[:2])


async def amain() -> int:
    args = config.arg_parser("omad", "the OMA API daemon").parse_args()
    cfg = config.load_from_args(Config, "omad", args)
    if args.show_config:
        print(config.dump(cfg))
        return 0
    logs.setup("omad", args.log_level or cfg.log_level)
    notifier = Notifier()
    stop = StopSignal()

    db = Database(cfg.database_path)
    await db.open()
    agents = Agents(cfg)
    runner: web.AppRunner | None = None
    try:
        await db.migrate()
        audit = Audit(db)
        auth = AuthService(db, audit, session_ttl=cfg.auth.session_ttl_seconds,
                           limiter=FailureLimiter(cfg.auth.login_failure_limit,
                                                  cfg.auth.login_failure_window_seconds))
        password_file = Path(cfg.state_dir) / "admin-password"
        password = await auth.bootstrap(password_file)
        if password:
            log.warning("created the administrator 'admin'; its password is in %s", password_file)
            print(f"omad: first start: user 'admin', password {password} (also in {password_file})", flush=True)

        apis = [HealthApi(Health(db, agents)), AuthApi(auth)]
        app = api_app.build(apis, auth, cors_origins=cfg.api.cors_origins, max_body=cfg.api.max_body_bytes)
        # The grace period belongs to the runner from aiohttp 3.9 on, to the site before (Debian 12 has
        # 3.8, whose runner hands unknown keywords to every connection handler and so drops each one).
        grace = {"shutdown_timeout": cfg.api.shutdown_grace_seconds}
        runner_grace = grace if _AIOHTTP >= (3, 9) else {}
        runner = web.AppRunner(app, handle_signals=False, access_log=None, **runner_grace)
        await runner.setup()
        site = web.TCPSite(runner, cfg.api.listen_address, cfg.api.port, reuse_address=True,
                           **({} if runner_grace else grace))
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("listening on %s", url)
        notifier.ready(f"listening on {url}")
        await stop.wait()
        notifier.stopping()
    finally:
        if runner is not None:
            await runner.cleanup()  # stops accepting, lets running requests finish within the grace period
        await agents.close()
        await db.close()
        log.info("stopped")
    return 0


def main() -> None:
    daemon.run(amain)
