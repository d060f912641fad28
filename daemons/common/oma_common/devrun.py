"""Run the four daemons in the foreground without systemd (`make run`, and the tests' fixtures).

Each daemon is started as a child with its own NOTIFY_SOCKET, so "ready" means exactly what systemd would
take it to mean: the daemon's main process sent READY=1 (NotifyAccess=main). The socket's address is in the
abstract namespace (unix(7)), so a launcher leaves no socket file behind however it ends (kill -9 included).
The launcher behaves like the installed units: a daemon that crashes is restarted alone (`Restart=on-failure`,
with a start limit), Ctrl-C, SIGTERM and SIGHUP stop omad first, then the agents, and if the launcher itself
dies its daemons get SIGTERM from the kernel (PR_SET_PDEATHSIG). Daemons left by an earlier launcher of the
same state directory are stopped before the new ones start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

AGENTS = ("nbd-pool", "restore-mounter", "volume-agent")
MODULES = {"omad": "omad", "nbd-pool": "nbd_pool", "restore-mounter": "restore_mounter",
           "volume-agent": "volume_agent"}


PR_SET_PDEATHSIG = 1
#: Restart=on-failure's defaults: at most this many starts of one daemon in this many seconds.
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL = 10.0
RESTART_DELAY = 0.1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, however it dies (kill -9 included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


#: struct ucred (unix(7)): pid, uid, gid.
CREDENTIALS = struct.Struct("iII")
CREDENTIALS_SIZE = CREDENTIALS.size


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The pid in a datagram's SCM_CREDENTIALS (sent by the kernel once SO_PASSCRED is set)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= CREDENTIALS_SIZE:
            pid: int = CREDENTIALS.unpack_from(data)[0]
            return pid
    return None


class DaemonFailed(Exception):
    """A daemon exited or stayed silent instead of becoming ready."""


@dataclass
class DaemonProcess:
    """One daemon as a child process, with readiness read from its sd_notify messages.

    Synchronous on purpose: test fixtures of any scope and the `make run` loop both use it.
    """

    name: str
    config_dir: Path
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    die_with_parent: bool = False
    proc: subprocess.Popen[bytes] | None = None
    status: str = ""
    _sock: socket.socket | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start and wait for READY=1; returns the STATUS it sent with it."""
        self.launch()
        self.wait_ready(timeout)
        return self.status

    def launch(self) -> None:
        """Start the process; wait_ready() then waits for its READY=1."""
        # An abstract address ("@" in NOTIFY_SOCKET, as sd_notify(3) and sdnotify accept): nothing in the
        # filesystem to remove, and it vanishes with the last descriptor whatever kills this process.
        name = f"oma-notify-{self.name}-{os.getpid()}-{secrets.token_hex(8)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + name)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd reads it
        env = dict(os.environ, NOTIFY_SOCKET="@" + name, PYTHONUNBUFFERED="1", **self.env)
        env.pop("JOURNAL_STREAM", None)
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", MODULES[self.name], "--config", str(self.config_dir), *self.extra_args],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them in order
                preexec_fn=_die_with_parent if self.die_with_parent else None)
        finally:
            if out:
                out.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self._sock is not None and self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise DaemonFailed(f"{self.name} exited with {self.proc.returncode} before it was ready"
                                   f"{self.log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DaemonFailed(f"{self.name} did not report READY within {timeout} s{self.log_tail()}")
            self._sock.settimeout(min(remaining, 0.2))
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS_SIZE))
            except socket.timeout:
                continue
            if _sender_pid(ancillary) != self.proc.pid:
                continue  # NotifyAccess=main: only the daemon's main process speaks for it
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if "STATUS" in fields:
                self.status = fields["STATUS"]
            if fields.get("READY") == "1":
                return

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path and self.log_path.exists():
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            return "\n--- log tail ---\n" + "\n".join(tail)
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait; SIGKILL if it does not go. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._sock:
            self._sock.close()
            self._sock = None
        return self.proc.returncode


def write_local_configs(state: Path, port: int, listen: str = "127.0.0.1") -> dict[str, Path]:
    """Drop-ins that put every path of the four daemons under `state` and let the current user call the agents."""
    run_dir = state / "run"
    uid = os.getuid()
    dirs = {}
    (state / "repositories").mkdir(parents=True, exist_ok=True)  # local repositories' out-of-the-box place
    for name in ("omad", *AGENTS):
        d = state / "config" / f"{name}.d"
        d.mkdir(parents=True, exist_ok=True)
        if name == "omad":
            text = (f'state_dir = "{state}"\nrun_dir = "{run_dir}"\n[api]\nlisten_address = "{listen}"\n'
                    f"port = {port}\n")
        else:
            text = (f'run_dir = "{run_dir}"\nstate_dir = "{state / name}"\n'
                    f'[socket]\ngroup = ""\nallowed_users = [{uid}]\n')
            if name == "restore-mounter":
                text = f'mount_root = "{state / "restore"}"\n' + text
            if name == "volume-agent":
                text = f'repository_mount_root = "{state / "mounts"}"\n' + text
            if name == "nbd-pool":
                # Local repositories of a `make run` appliance live under <state>/repositories.
                text = (f'export_roots = ["{state / "repositories"}", "{state / "mounts"}", "/dev/disk/by-id"]\n'
                        f'vouched_registry = "{state / "volume-agent" / "vouched.json"}"\n' + text)
        (d / "10-local.toml").write_text(text)
        dirs[name] = d
    return dirs


def leftovers(dirs: dict[str, Path]) -> list[psutil.Process]:
    """Daemons still running with this state directory's configuration (their launcher died)."""
    wanted = {(MODULES[name], str(d)) for name, d in dirs.items()}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if len(argv) >= 5 and argv[1] == "-m" and argv[3] == "--config" and (argv[2], argv[4]) in wanted:
            found.append(p)
    return found


def stop_leftovers(dirs: dict[str, Path], timeout: float = 15.0) -> list[str]:
    """Stop daemons an earlier launcher of the same state directory left behind: SIGTERM, wait, SIGKILL."""
    procs = leftovers(dirs)
    # omad first, as a normal stop would.
    procs.sort(key=lambda p: 0 if "omad" in (p.info["cmdline"] or ["", "", ""])[2] else 1)
    names = []
    for p in procs:
        names.append(f"{p.info['cmdline'][2]} (pid {p.pid})")
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
            if not _gone(p, timeout):
                p.kill()
                _gone(p, 5)
    return names


def _gone(p: psutil.Process, timeout: float) -> bool:
    """Whether `p` (not our child: we cannot reap it) exited within `timeout`; a zombie has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


class Restarts:
    """Restart=on-failure with StartLimitBurst/StartLimitIntervalSec: too many starts → give up."""

    def __init__(self, burst: int = START_LIMIT_BURST, interval: float = START_LIMIT_INTERVAL) -> None:
        self.burst = burst
        self.interval = interval
        self._starts: dict[str, list[float]] = {}

    def allow(self, name: str, now: float) -> bool:
        recent = [t for t in self._starts.get(name, []) if now - t < self.interval]
        if len(recent) >= self.burst:
            return False
        self._starts[name] = [*recent, now]
        return True


def run_local(state: Path, port: int) -> int:
    state = state.resolve()
    dirs = write_local_configs(state, port)
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[DaemonProcess] = []
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    restarts = Restarts()
    try:
        for name in stop_leftovers(dirs):
            print(f"stopped {name}, left running by an earlier launcher of {state}", flush=True)
        for name in (*AGENTS, "omad"):
            d = DaemonProcess(name, dirs[name], log_path=logs / f"{name}.log", die_with_parent=True)
            restarts.allow(name, time.monotonic())
            d.start()
            started.append(d)
            print(f"{name}: ready (pid {d.pid}, log {d.log_path})", flush=True)
        url = started[-1].status.removeprefix("listening on ").strip()
        password_file = state / "admin-password"
        print(f"\nOMA API: {url}/api/v1   docs: {url}/swagger/   health: {url}/health")
        if password_file.exists():
            print(f"login: admin / {password_file.read_text().strip()}   (from {password_file})")
        print("Ctrl-C stops everything.", flush=True)
        while not stopping:
            for d in started:
                if d.running() or d.proc is None:
                    continue
                code = d.proc.returncode
                d.stop()  # closes its notify socket
                if code == 0:
                    print(f"{d.name} exited cleanly; not restarted (Restart=on-failure)", file=sys.stderr)
                    d.proc = None
                    continue
                if not restarts.allow(d.name, time.monotonic()):
                    print(f"{d.name} failed {START_LIMIT_BURST} times within {START_LIMIT_INTERVAL:g} s; "
                          f"stopping everything (see {d.log_path})", file=sys.stderr)
                    return 1
                print(f"{d.name} exited with {code}; restarting it (see {d.log_path})", file=sys.stderr, flush=True)
                time.sleep(RESTART_DELAY)
                try:
                    d.start()
                    print(f"{d.name}: ready again (pid {d.pid})", flush=True)
                except DaemonFailed as e:
                    print(f"{d.name}: restart failed: {e}", file=sys.stderr, flush=True)
            time.sleep(0.2)
        return 0
    except DaemonFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for d in reversed(started):
            if d.proc is not None:
                print(f"{d.name}: stopped ({d.stop()})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description="run the four OMA daemons in the foreground (development)")
    p.add_argument("--state-dir", type=Path, default=Path(".run"))
    p.add_argument("--port", type=int, default=8082)
    args = p.parse_args()
    sys.exit(run_local(args.state_dir, args.port))


if __name__ == "__main__":
    main()
