"""A throw-away Debian 12 machine: a cached mmdebstrap root, booted with systemd-nspawn, driven with nsenter.

The host has no systemd as PID 1, so there is no machined: the container runs with --register=no
--keep-unit, and commands enter its namespaces (nsenter -t <its PID 1> -a) instead of `systemd-run -M`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
BASE_PACKAGES = ("systemd", "dbus")
# Bump when the way the root is made changes, so that old caches are not reused.
RECIPE = "4"
ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "TERM=dumb")


# What the appliance has for attaching images read-only: FUSE and loop control (its nbd-pool then uses the
# fuse-loop backend). Nothing else of the host's /dev: nspawn's /dev is a tmpfs with a fixed set of nodes,
# and each --bind= below adds one. Not /dev/nbd*, even where the host has the module: sysfs shows the
# container every nbd device of the host, with the host's pid of its server, so the container's nbd-pool
# cannot tell the host's connected devices from leftovers of its own and its start-up sweep would
# disconnect them (the kernel-nbd backend is covered on such a host by tests/nbd_pool).
DEVICES = ("/dev/fuse", "/dev/loop-control")


def device_binds() -> list[str]:
    return [f"--bind={d}" for d in DEVICES if Path(d).exists()]


# The container's udev/devtmpfs for loop devices: the appliance's devtmpfs creates /dev/loopN and the
# /dev/loopNpM nodes of the partitions that `partx --add` (BLKPG) adds, and removes them with the devices;
# nspawn's /dev is a tmpfs that never changes. This keeps /dev/loop* in step with /sys/class/block, as a
# systemd service inside the container. Loop devices are the host's too: only the free ones (for
# `losetup --find`) and those bound to a file the container has (its own) get a node, with their partitions.
DEVNODES = """
import os, re, stat, time
from pathlib import Path

SYS = Path("/sys/class/block")
DISK_GID = 6  # group disk, as devtmpfs + udev make them

def ours(loop):
    try:
        back = (SYS / loop / "loop" / "backing_file").read_text().strip()
    except FileNotFoundError:
        return True  # free: losetup --find may hand it out
    except OSError:
        return False
    return os.path.isfile(back.removesuffix(" (deleted)"))  # the host's files are not in the container

def wanted():
    out = {}
    for d in SYS.iterdir():
        m = re.fullmatch(r"(loop[0-9]+)(p[0-9]+)?", d.name)
        if m is None or not ours(m.group(1)):
            continue
        try:
            major, minor = map(int, (d / "dev").read_text().split(":"))
        except (OSError, ValueError):
            continue
        out[d.name] = os.makedev(major, minor)
    return out

while True:
    want = wanted()
    for name, rdev in want.items():
        node = Path("/dev") / name
        try:
            st = node.lstat()
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                continue
            node.unlink()
        except FileNotFoundError:
            pass
        os.mknod(node, stat.S_IFBLK | 0o660, rdev)
        os.chown(node, 0, DISK_GID)
    for node in Path("/dev").glob("loop*"):
        if node.name != "loop-control" and node.name not in want and node.is_block_device():
            node.unlink()
    Path("/run/devnodes.ready").touch()
    time.sleep(0.02)
"""


class BootFailed(Exception):
    """The container did not come up; `started` tells whether its systemd ran at all."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


def host_sources() -> list[Path]:
    """The host's apt sources for Debian 12 (its configured mirror; the network reaches only that)."""
    found = []
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
                  *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for f in candidates:
        if f.is_file() and SUITE in f.read_text():
            found.append(f)
    if not found:
        raise RuntimeError(f"no apt source for {SUITE} on this host (/etc/apt/sources.list*)")
    return found


def root_key(predownload: list[str]) -> str:
    h = hashlib.sha256()
    for part in (RECIPE, SUITE, VARIANT, ",".join(BASE_PACKAGES), ",".join(sorted(predownload))):
        h.update(part.encode() + b"\0")
    for f in host_sources():
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def base_root(cache_dir: Path, predownload: list[str], log: Path) -> Path:
    """A tarball of a clean Debian 12 minbase root with systemd and dbus, cached under `cache_dir`.

    Nothing of ours is installed in it. The .debs of `predownload` (the package's dependencies) wait in
    its apt cache, and its package lists are kept, so that `apt-get install ./oma-appliance*.deb` inside
    resolves and installs them the normal way, without a network. Keyed on everything that goes into it.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"{SUITE}-{VARIANT}-{root_key(predownload)}.tar"
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller waits and reuses it
        if tarball.exists():
            return tarball
        tmp = tarball.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        deps = " ".join(predownload)
        download = f"apt-get install --download-only --no-install-recommends -y -q {deps}"
        cmd = ["mmdebstrap", "--mode=root", f"--variant={VARIANT}", f"--include={','.join(BASE_PACKAGES)}",
               "--skip=cleanup/apt/lists", "--skip=cleanup/apt/cache", "--format=tar",
               "--customize-hook=chroot \"$1\" apt-get clean",
               f"--customize-hook=chroot \"$1\" {download}",
               SUITE, str(tmp), *map(str, host_sources())]
        with open(log, "ab") as out:
            p = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=900)
        if p.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"mmdebstrap failed ({p.returncode}); see {log}")
        tmp.rename(tarball)
        for old in cache_dir.glob(f"{SUITE}-*.tar"):  # keep only the current one
            if old != tarball:
                old.unlink(missing_ok=True)
        return tarball


def _die_with_parent() -> None:
    """In the child before exec: if the test process dies, nspawn gets SIGTERM and halts the container."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


class Machine:
    """One booted container over a directory of its own."""

    def __init__(self, directory: Path, name: str, log: Path) -> None:
        self.directory = directory
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    @classmethod
    def from_tarball(cls, tarball: Path, directory: Path, name: str, log: Path) -> Machine:
        """Unpack the root onto a tmpfs of its own: dpkg's fsyncs cost nothing there, and removing the
        machine is one unmount (a few hundred MB of RAM while it lives)."""
        directory.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=4G", "oma-test-root", str(directory)],
                       check=True, capture_output=True)
        subprocess.run(["tar", "-C", str(directory), "--numeric-owner", "-xpf", str(tarball)], check=True,
                       capture_output=True, timeout=300)
        return cls(directory, name, log)

    def boot(self, timeout: float = 90.0) -> str:
        """Start systemd-nspawn -b and wait until the container's systemd finished booting."""
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--boot", f"--directory={self.directory}", f"--machine={self.name}",
                 "--register=no", "--keep-unit", "--console=pipe", "--private-network", "--link-journal=no",
                 "--resolv-conf=off", "--timezone=off",
                 # nspawn's seccomp filter denies bpf(); allowed, the container's systemd can enforce
                 # IPAddressDeny= with its cgroup BPF firewall, as it does on the appliance. It denies
                 # openat2() too (ENOSYS), which the agents use to stay beneath their roots (volume-agent's
                 # immutability locks have no fallback): the appliance's kernel has it.
                 "--system-call-filter=bpf openat2", *device_binds()],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        own_pidns = os.readlink("/proc/self/ns/pid")
        while not self.leader:
            if self.proc.poll() is not None:
                raise BootFailed(f"systemd-nspawn exited with {self.proc.returncode}{self.log_tail()}", started=False)
            if time.monotonic() > deadline:
                raise BootFailed(f"no init appeared in the container within {timeout} s{self.log_tail()}",
                                 started=False)
            for pid in _children(self.proc.pid):
                with contextlib.suppress(OSError):
                    if (Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
                            and os.readlink(f"/proc/{pid}/ns/pid") != own_pidns):
                        self.leader = pid
            time.sleep(0.05)
        while True:  # right after exec, systemd may not answer on its private socket yet
            left = deadline - time.monotonic()
            try:
                p = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=max(1.0, left))
            except subprocess.TimeoutExpired:
                raise BootFailed(f"the container's systemd did not finish booting within {timeout} s"
                                 f"{self.log_tail()}", started=True) from None
            state = p.stdout.strip()
            if state in ("running", "degraded"):
                return state
            if left <= 0 or self.proc.poll() is not None:
                raise BootFailed(f"the container's systemd did not finish booting: {state!r} {p.stderr}"
                                 f"{self.log_tail()}", started=True)
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, a clean environment)."""
        assert self.leader, "not booted"
        cmd = ["nsenter", f"--target={self.leader}", "--all", "--", "/usr/bin/env", "-i", *ENV, *argv]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(argv)} exited {p.returncode}\n"
                                 f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
        return p

    def start_devnodes(self, timeout: float = 10.0) -> None:
        """Run DEVNODES in the container (it needs python3: call it once the package brought it)."""
        script = self.directory / "usr/local/lib/oma-test-devnodes.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(DEVNODES)
        self.run("systemd-run", "--unit=oma-test-devnodes", "--collect", "/usr/bin/python3", "/" + str(
            script.relative_to(self.directory)))
        deadline = time.monotonic() + timeout
        while self.run("test", "-e", "/run/devnodes.ready", check=False).returncode != 0:
            assert time.monotonic() < deadline, self.run("journalctl", "-u", "oma-test-devnodes", "--no-pager",
                                                         check=False).stdout[-2000:]
            time.sleep(0.1)

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, **kw)  # type: ignore[arg-type]

    def copy_in(self, src: Path, dest: str) -> None:
        target = self.directory / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            tail = self.log.read_text(errors="replace").splitlines()[-lines:]
            return "\n--- nspawn log tail ---\n" + "\n".join(tail)
        return ""

    def shutdown(self, timeout: float = 30.0) -> None:
        """Halt the container (SIGTERM to nspawn asks its systemd to halt), then harder if it must."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                # The second SIGTERM makes nspawn terminate the container at once.
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait)
                    break
        if self.leader and Path(f"/proc/{self.leader}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)

    def mounts_below(self) -> list[str]:
        """Mount points under the machine's directory in our mount namespace (nspawn's are in its own)."""
        prefix = str(self.directory.resolve()) + "/"
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4].encode().decode("unicode_escape")
            if target.startswith(prefix) or target == prefix[:-1]:
                found.append(target)
        return found

    def stray_mounts(self) -> list[str]:
        """Mounts below the machine's directory other than its own tmpfs (none should outlive nspawn)."""
        return [t for t in self.mounts_below() if t != str(self.directory.resolve())]

    def alive(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None) or (
            bool(self.leader) and Path(f"/proc/{self.leader}").exists())

    def remove(self) -> None:
        """Unmount whatever is mounted below the directory (deepest first, its tmpfs last) and delete it."""
        for target in sorted(self.mounts_below(), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", target], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)
