"""omactl: the operator's command line — users, API tokens, VMAs, the audit trail and the appliance's status."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import pwd
import sys
import unicodedata
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from oma_common import config
from oma_common.contracts.volume_agent import SessionIn, Terminated
from oma_common.errors import OmaError
from oma_common.process import process_start_time

from .audit import Audit
from .auth.ratelimit import FailureLimiter
from .auth.service import ROLES, AuthService
from .clients.agents import Agents
from .clients.volume_agent import VolumeAgent
from .config import Config
from .vma.enrollment import Enrollments
from .store.db import Database


# Columns of each listing in the table people read (--json prints every field).
USER_COLUMNS = ("username", "role", "disabled", "created_at")
TOKEN_COLUMNS = ("name", "role", "appliance_id", "created_by", "created_at", "expires_at", "revoked_at",
                 "last_used_at")
VMA_COLUMNS = ("id", "vma_name", "status", "key_fingerprint", "source", "created_at", "decided_by", "revoked_at")
AUDIT_COLUMNS = ("at", "actor", "action", "resource", "outcome", "source", "details")
_WIDEST = 60  # a longer cell is cut with "…" (--json has it whole)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omactl", description="manage the OMA appliance")
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--json", action="store_true", help="print JSON (one object per line) instead of a table")
    p.add_argument("--config", action="append", type=Path, metavar="DIR", help="omad's config drop-in directory")
    sub = p.add_subparsers(dest="cmd", required=True)

    user = sub.add_parser("user", help="people who log in").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a user")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, default="operator")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    pw = user.add_parser("passwd", help="change a user's password (ends the user's sessions)")
    pw.add_argument("username")
    pw.add_argument("--password-stdin", action="store_true")
    user.add_parser("list", help="list users", parents=[fmt])

    tok = sub.add_parser("token", help="API tokens for machines and scripts").add_subparsers(dest="action",
                                                                                           required=True)
    create = tok.add_parser("create", help="create a token (printed once)")
    create.add_argument("name")
    create.add_argument("--role", choices=ROLES, default="operator")
    create.add_argument("--appliance-id", help="bind the token to the appliance id sent at login")
    create.add_argument("--expires-days", type=int)
    revoke = tok.add_parser("revoke", help="revoke a token and end its sessions")
    revoke.add_argument("name")
    tok.add_parser("list", help="list tokens", parents=[fmt])

    audit = sub.add_parser("audit", help="recent audit events", parents=[fmt])
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--action")

    vma = sub.add_parser("vma", help="enrolled VMAs and their SSH tunnel").add_subparsers(dest="action", required=True)
    vma.add_parser("list", help="every enrollment", parents=[fmt])
    code = vma.add_parser("pairing-code", help="a single-use pairing code for a new VMA")
    code.add_argument("--valid-for", type=int, default=600, metavar="SECONDS")
    approve = vma.add_parser("approve", help="let a verified enrollment's key open the tunnel")
    approve.add_argument("enrollment_id")
    approve.add_argument("--notes", default="")
    reject = vma.add_parser("reject", help="reject an enrollment")
    reject.add_argument("enrollment_id")
    reject.add_argument("--reason", default="")
    revoke_vma = vma.add_parser("revoke", help="revoke an approved VMA and end its tunnel")
    revoke_vma.add_argument("enrollment_id")
    keys = vma.add_parser("authorized-keys", help="sshd's AuthorizedKeysCommand: the approved key lines for USER")
    keys.add_argument("user")
    keys.add_argument("fingerprint", nargs="?", help="only the key with this fingerprint (sshd's %%f)")

    sub.add_parser("status", help="ask the running omad for its health", parents=[fmt])
    return p


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise OmaError("passwords differ", "the two passwords typed were not the same")
    return first


def printable(value: Any) -> str:
    """A cell for a terminal: control characters (ESC, CR, ...) and invalid Unicode shown escaped, never raw."""
    text = value if isinstance(value, str) else "" if value is None else \
        json.dumps(value, default=str, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        out.append(ch.encode("unicode_escape").decode("ascii") if cat in ("Cc", "Cs", "Cf", "Zl", "Zp") else ch)
    cell = "".join(out)
    return cell if len(cell) <= _WIDEST else cell[:_WIDEST - 1] + "…"


def table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Rows as aligned columns under a header."""
    cells = [[printable(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _print(rows: list[dict[str, Any]], columns: tuple[str, ...], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(r, default=str))
    else:
        print(table(rows, columns))


def _status(cfg: Config, as_json: bool = False) -> int:
    url = f"{cfg.api_base_url()}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"omad is not answering at {url}: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(body))
        return 0 if body["status"] == "healthy" else 2
    print(f"{body['service']}: {body['status']} (version {body['version']}, database {body['database']})")
    for name, comp in body.get("components", {}).items():
        details = printable(comp["details"]) if comp.get("details") else ""
        print(f"  {printable(name)}: {printable(comp.get('status'))}{' - ' + details if details else ''}")
    return 0 if body["status"] == "healthy" else 2


def _alive(pid: int, start: float) -> bool:
    """Whether the process recorded as (pid, start time) still runs."""
    actual = process_start_time(pid)
    return actual is not None and abs(actual - start) <= 0.05


async def _authorized_keys(args: argparse.Namespace, cfg: Config) -> int:
    """Run by sshd (as AuthorizedKeysCommandUser) for each key offered: print the approved lines, nothing else.

    The parent process is sshd's per-connection monitor; it is recorded with the key handed out, so that a
    revocation can end this session. Any failure prints nothing: sshd then refuses the key.
    """
    if not cfg.database_path.exists():
        return 0  # omad never ran: nothing is approved
    monitor_pid = os.getppid()
    start = process_start_time(monitor_pid)
    if start is None:
        return 0  # the asking sshd is gone: nothing to hand out
    db = Database(cfg.database_path)
    await db.open()
    try:
        enrollments = Enrollments.from_config(cfg, db, Audit(db), _NoSessions())
        lines = await enrollments.authorized_keys(args.user, args.fingerprint, (monitor_pid, start), _alive)
    finally:
        await db.close()
    for line in lines:
        print(line)
    return 0


class _NoSessions:
    async def end_tunnel_sessions(self, sessions: list[SessionIn]) -> Terminated:
        raise OmaError("not available", "ending sessions is not done here")


async def _vma(args: argparse.Namespace, cfg: Config, db: Database) -> None:
    agents = Agents(cfg)
    try:
        enrollments = Enrollments.from_config(cfg, db, Audit(db), VolumeAgent(agents.volume_agent))
        if args.action == "list":
            _print(await enrollments.everything(), VMA_COLUMNS, args.json)
        elif args.action == "pairing-code":
            out = await enrollments.create_pairing_code(args.valid_for, generated_by=None, actor=_actor())
            print(f"{out['pairing_code']} (valid until {out['expires_at']})")
        elif args.action == "approve":
            print((await enrollments.approve(args.enrollment_id, approved_by=None, notes=args.notes,
                                             actor=_actor()))["message"])
        elif args.action == "reject":
            print((await enrollments.reject(args.enrollment_id, rejected_by=None, reason=args.reason,
                                            actor=_actor()))["message"])
        elif args.action == "revoke":
            print((await enrollments.revoke(args.enrollment_id, revoked_by=None, actor=_actor()))["message"])
    finally:
        await agents.close()


def _actor() -> str:
    """Who runs omactl, for the audit trail."""
    try:
        return f"omactl:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"omactl:uid {os.getuid()}"


async def _run(args: argparse.Namespace, cfg: Config) -> int:
    db = Database(cfg.database_path)
    await db.open()
    try:
        await db.migrate()
        auth = AuthService(db, Audit(db), session_ttl=cfg.auth.session_ttl_seconds,
                           limiter=FailureLimiter(cfg.auth.login_failure_limit, cfg.auth.login_failure_window_seconds),
                           bootstrap_file=Path(cfg.state_dir) / "admin-password")
        if args.cmd == "user":
            if args.action == "add":
                await auth.add_user(args.username, _password(args.password_stdin), args.role)
                print(f"user {args.username} added ({args.role})")
            elif args.action == "passwd":
                await auth.set_password(args.username, _password(args.password_stdin))
                print(f"password of {args.username} changed")
            else:
                _print(await auth.list_users(), USER_COLUMNS, args.json)
        elif args.cmd == "token":
            if args.action == "create":
                token = await auth.create_token(args.name, args.role, appliance_id=args.appliance_id,
                                                expires_days=args.expires_days)
                print(token)
            elif args.action == "revoke":
                await auth.revoke_token(args.name)
                print(f"token {args.name} revoked")
            else:
                _print(await auth.list_tokens(), TOKEN_COLUMNS, args.json)
        elif args.cmd == "vma":
            await _vma(args, cfg, db)
        elif args.cmd == "audit":
            _print(await Audit(db).recent(args.limit, args.action), AUDIT_COLUMNS, args.json)
        return 0
    finally:
        await db.close()


def main() -> None:
    args = _parser().parse_args()
    try:
        cfg = config.load(Config, args.config or config.default_dirs("omad"))
        if args.cmd == "status":
            sys.exit(_status(cfg, args.json))
        if args.cmd == "vma" and args.action == "authorized-keys":
            sys.exit(asyncio.run(_authorized_keys(args, cfg)))
        sys.exit(asyncio.run(_run(args, cfg)))
    except OmaError as e:
        print(f"omactl: {e.message}: {e.details}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
