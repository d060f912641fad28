"""The .deb on a clean Debian 12 with systemd as PID 1: install, run, restart, upgrade, remove, purge.

A minbase root (cached in .cache/nspawn-root) is booted with systemd-nspawn and driven with nsenter. The
tests run in file order against one container and build on each other: install first, purge last.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

import debbuild
import nspawn_box
from e2e_box import HTTP, VCENTER, VM, Appliance
from nspawn_box import BootFailed, Machine
from tests.lib.diskimages import File, Pattern, Tree, ext4_modify, gpt_two_ext4

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]

CACHE = debbuild.REPO / ".cache" / "nspawn-root"
SERVICES = ("nbd-pool", "restore-mounter", "volume-agent", "omad")
AGENTS = SERVICES[:3]
API = "http://127.0.0.1:8082"
TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "tar")
MiB = 1024 * 1024
E2E_DATA = Pattern(2 * MiB, seed=7)
E2E_ROOT_TREE: Tree = {"etc/hostname": b"db01\n", "etc/motd": b"welcome\n", "var/lib/app/data.bin": File(E2E_DATA)}
E2E_DATA_TREE: Tree = {"db/README": b"backup me\n"}


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mmdebstrap, systemd-nspawn and nsenter")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install mmdebstrap systemd-container util-linux)")


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[Path]]:
    """Starts making (or finding) the cached root at once, so that it overlaps the package builds."""
    _skip_unless_possible()
    log = tmp_path_factory.mktemp("nspawn-logs") / "mmdebstrap.log"
    future: Future[Path] = Future()

    def make() -> None:
        try:
            future.set_result(nspawn_box.base_root(CACHE, debbuild.control_depends(), log))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting fixture
            future.set_exception(e)

    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    yield future
    thread.join()


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    t: dict[str, float] = {"start": time.monotonic()}
    yield t
    total = time.monotonic() - t.pop("start")
    print("\nnspawn test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + f"; total {total:.1f} s")


@pytest.fixture(scope="module")
def machine(base_root: Future[Path], deb_build: debbuild.DebBuild, upgrade_deb: debbuild.DebBuild,
            tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]) -> Iterator[Machine]:
    """A booted container holding both packages in /root; halted and removed on every path."""
    t0 = time.monotonic()
    tarball = base_root.result(timeout=900)
    timings["root ready"] = time.monotonic() - timings["start"]
    work = tmp_path_factory.mktemp("nspawn")
    m = Machine.from_tarball(tarball, work / "root", f"oma-test-{os.getpid()}", work / "nspawn.log")
    try:
        m.copy_in(deb_build.deb, f"/root/{deb_build.deb.name}")
        m.copy_in(upgrade_deb.deb, f"/root/{upgrade_deb.deb.name}")
        try:
            m.boot()
        except BootFailed as e:
            if not e.started:
                pytest.skip(f"systemd-nspawn cannot boot a container on this host: {e}")
            raise
        timings["boot"] = time.monotonic() - t0
        yield m
    finally:
        m.shutdown()
        leftover = m.alive()
        stray = m.stray_mounts()
        m.remove()
        assert not leftover, "the container's processes outlived its shutdown"
        assert not stray, f"mounts left under the container's directory: {stray}"
        assert not m.mounts_below() and not m.directory.exists(), "the container's root was not removed"


@pytest.fixture(scope="module")
def installed(machine: Machine, deb_build: debbuild.DebBuild, timings: dict[str, float]) -> Machine:
    """`apt-get install --no-install-recommends ./oma-appliance_*.deb`, as the README tells an operator.

    The container has no network (--private-network): everything must come from the root's apt cache.
    """
    t0 = time.monotonic()
    p = machine.run("apt-get", "install", "--no-install-recommends", "-y", "-q", f"/root/{deb_build.deb.name}",
                    timeout=400, check=False)
    timings["apt-get install"] = time.monotonic() - t0
    assert p.returncode == 0, f"apt-get install failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    assert "is a disabled or a static unit" not in p.stderr, p.stderr
    return machine


# -- helpers ------------------------------------------------------------------------------------------------


def http(m: Machine, method: str, path: str, body: object = None, token: str = "") -> tuple[int, object]:
    p = m.run("python3", "-c", HTTP, method, API + path, json.dumps(body) if body is not None else "", token, "")
    out = json.loads(p.stdout)
    return out["status"], out["body"]


def health(m: Machine, token: str = "") -> dict:
    status, body = http(m, "GET", "/health", token=token)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def wait_healthy(m: Machine, timeout: float = 20.0, **component_pids: int) -> dict:
    """Poll /health until it is green (and names the given agents' pids: details need a token); omad probes
    the agents per call."""
    deadline = time.monotonic() + timeout
    token = ""
    if component_pids:
        status, session = login(m, "admin", admin_password(m))
        assert status == 200, session
        token = session["session_token"]
    while True:
        try:
            body = health(m, token)
        except (AssertionError, ValueError):
            body = {}
        comps = body.get("components", {})
        pids_ok = all(comps.get(name, {}).get("pid") == pid for name, pid in component_pids.items())
        if body.get("status") == "healthy" and pids_ok:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"not healthy within {timeout} s: {body}")
        time.sleep(0.2)


# minbase has no procps (pgrep); the package brings python3.
PIDS = """
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[:-1]
    except OSError:
        continue
    if [a.decode(errors="replace") for a in argv] == sys.argv[1:]:
        print(pid)
"""


PROGRAM_PIDS = """
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv0 = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0]
    except OSError:
        continue
    if os.path.basename(argv0.decode(errors="replace")) == sys.argv[1]:
        print(pid)
"""

# The mount id and mount point of every mount below a prefix (ids are never reused while mounted).
MOUNT_IDS = """
import sys
for line in open("/proc/self/mountinfo"):
    f = line.split()
    if f[4].startswith(sys.argv[1]):
        print(f[0], f[4])
"""


def pids_by_program(m: Machine, program: str) -> list[str]:
    """Processes in the container running `program` (by the base name of argv[0])."""
    return m.run("python3", "-c", PROGRAM_PIDS, program).stdout.split()


def pids_of(m: Machine, *argv: str) -> list[str]:
    """Processes in the container whose command line is exactly `argv`."""
    return m.run("python3", "-c", PIDS, *argv).stdout.split()


def prop(m: Machine, unit: str, name: str) -> str:
    return m.run("systemctl", "show", "--value", "-p", name, unit).stdout.strip()


def admin_password(m: Machine) -> str:
    return m.run("cat", "/var/lib/oma/admin-password").stdout.strip()


def login(m: Machine, username: str, password: str) -> tuple[int, dict]:
    status, body = http(m, "POST", "/api/v1/auth/login", {"username": username, "password": password})
    assert isinstance(body, dict)
    return status, body


# -- the checks, in order -----------------------------------------------------------------------------------


def test_install_creates_user_directories_and_enables_the_target(installed: Machine) -> None:
    m = installed
    passwd = m.run("getent", "passwd", "oma").stdout.split(":")
    assert passwd[5] == "/var/lib/oma" and passwd[6].strip().endswith("nologin")
    listing = m.run("stat", "-c", "%n %a %U %G", "/var/lib/oma", "/var/lib/oma-agents", "/run/oma",
                    "/var/lib/oma/admin-password", "/var/lib/oma/oma.db").stdout.split("\n")
    assert listing[:5] == ["/var/lib/oma 750 oma oma", "/var/lib/oma-agents 700 root root",
                           "/run/oma 755 root root", "/var/lib/oma/admin-password 600 oma oma",
                           "/var/lib/oma/oma.db 600 oma oma"]
    assert m.run("systemctl", "is-enabled", "oma.target").stdout.strip() == "enabled"
    # The VMA tunnel's account, and sshd's drop-in that lets only approved keys in as it (as oma).
    tunnel = m.run("getent", "passwd", "vma_tunnel").stdout.split(":")
    assert tunnel[6].strip().endswith("nologin")
    effective = m.run("sshd", "-T", "-C", "user=vma_tunnel,host=vma,addr=127.0.0.1").stdout
    assert "authorizedkeyscommand /usr/bin/omactl vma authorized-keys %u %f" in effective
    assert "authorizedkeyscommanduser oma" in effective and "permittty no" in effective


def test_all_four_services_are_active_with_notify_readiness(installed: Machine) -> None:
    m = installed
    for s in SERVICES:
        assert prop(m, f"{s}.service", "Type") == "notify", s
        assert prop(m, f"{s}.service", "ActiveState") == "active", m.run(
            "journalctl", "-b", "-u", s, "--no-pager").stdout[-2000:]
        assert prop(m, f"{s}.service", "SubState") == "running"
        assert prop(m, f"{s}.service", "NRestarts") == "0", f"{s} restarted: it failed at least once"
    assert prop(m, "oma.target", "ActiveState") == "active"
    # The agents' sockets: root:oma 0660, so that omad (user oma) may call them.
    socks = m.run("stat", "-c", "%n %a %U %G", *(f"/run/oma/{a}.sock" for a in AGENTS)).stdout.split("\n")
    assert socks[:3] == [f"/run/oma/{a}.sock 660 root oma" for a in AGENTS]


def test_health_is_green_from_inside(installed: Machine) -> None:
    body = wait_healthy(installed)
    assert body["database"] == "connected"
    assert {c: v["status"] for c, v in body["components"].items()} == {
        "database": "ok", "nbd-pool": "ok", "restore-mounter": "ok", "volume-agent": "ok", "storage": "ok"}
    p = installed.run("omactl", "status")
    assert "healthy" in p.stdout


def test_login_with_the_bootstrap_credentials(installed: Machine) -> None:
    m = installed
    status, body = login(m, "admin", admin_password(m))
    assert status == 200 and body["success"] is True and body["role"] == "admin", body
    status, me = http(m, "GET", "/api/v1/auth/me", token=body["session_token"])
    assert status == 200 and me == {"name": "admin", "role": "admin", "kind": "user"}
    status, body = login(m, "admin", "not-the-password")
    assert status == 401 and body["success"] is False


def test_swagger_ui_is_served_from_the_packaged_files(installed: Machine) -> None:
    status, page = http(installed, "GET", "/swagger/")
    assert status == 200 and "swagger" in str(page).lower()
    status, _ = http(installed, "GET", "/swagger/swagger-ui-bundle.js")
    assert status == 200


def test_restarting_each_daemon_recovers_and_omad_reports_it(installed: Machine) -> None:
    m = installed
    for s in SERVICES:
        before = int(prop(m, f"{s}.service", "MainPID"))
        m.run("systemctl", "restart", f"{s}.service")  # returns once the new process sent READY=1
        after = int(prop(m, f"{s}.service", "MainPID"))
        assert after not in (0, before) and prop(m, f"{s}.service", "ActiveState") == "active", s
        if s in AGENTS:
            # Readiness means bound: the socket is there the moment `systemctl restart` returns.
            m.run("test", "-S", f"/run/oma/{s}.sock")
            wait_healthy(m, **{s: after})
        else:
            wait_healthy(m)
            assert login(m, "admin", admin_password(m))[0] == 200
        assert prop(m, f"{s}.service", "NRestarts") == "0"


def test_nbd_pool_children_outlive_its_restart(installed: Machine) -> None:
    """KillMode=process: a child of nbd-pool (an export, in real life) survives `systemctl restart`."""
    m = installed
    m.sh("mkdir -p /run/systemd/system/nbd-pool.service.d && printf '[Service]\\nExecStartPost=/bin/sh -c "
         "\"sleep 3601 >/dev/null 2>&1 &\"\\n' > /run/systemd/system/nbd-pool.service.d/child.conf && "
         "systemctl daemon-reload && systemctl restart nbd-pool")
    first = pids_of(m, "sleep", "3601")
    assert len(first) == 1
    m.run("systemctl", "restart", "nbd-pool")
    survivors = pids_of(m, "sleep", "3601")
    assert first[0] in survivors and len(survivors) == 2, survivors
    m.sh("rm -r /run/systemd/system/nbd-pool.service.d && systemctl daemon-reload")
    wait_healthy(m)


# Run by nbd-pool.service itself (ExecStartPost=, same sandbox): which addresses may it reach?
FIREWALL_PROBE = """
import errno, socket
out = []
for addr in ("127.0.0.1", "192.0.2.1"):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((addr, 9))
        out.append(addr + " connected")
    except TimeoutError:
        out.append(addr + " dropped")
    except OSError as e:
        out.append(addr + " " + errno.errorcode.get(e.errno, str(e.errno)))
open("/run/oma-firewall-probe", "w").write("\\n".join(out))
"""


def test_nbd_pool_reaches_the_loopback_only(installed: Machine) -> None:
    """IPAddressDeny=any + IPAddressAllow=localhost: the unauthenticated exports stay on the loopback."""
    m = installed
    enforced = m.run("systemd-run", "--wait", "--pipe", "--quiet", "-p", "IPAddressDeny=any", "/usr/bin/python3",
                     "-c", "import socket\ntry:\n socket.socket(type=socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))"
                     "\n print('sent')\nexcept PermissionError:\n print('denied')").stdout.strip()
    if enforced != "denied":
        pytest.skip("this container's systemd cannot enforce IPAddressDeny= (no cgroup BPF firewall here); "
                    "the unit's setting is checked statically in test_units.py")
    # A non-loopback address in the container's own network namespace (--private-network): TEST-NET-1 on lo.
    m.run("python3", "-c", "from pyroute2 import IPRoute; ip = IPRoute(); "
          "ip.addr('add', index=ip.link_lookup(ifname='lo')[0], address='192.0.2.1', mask=32)")
    m.run("python3", "-c", f"open('/run/oma-firewall-probe.py', 'w').write({FIREWALL_PROBE!r})")
    m.sh("mkdir -p /run/systemd/system/nbd-pool.service.d && printf '[Service]\\nExecStartPost=-/usr/bin/python3 "
         "/run/oma-firewall-probe.py\\n' > /run/systemd/system/nbd-pool.service.d/probe.conf && "
         "systemctl daemon-reload && systemctl restart nbd-pool")
    try:
        result = m.run("cat", "/run/oma-firewall-probe").stdout.splitlines()
    finally:
        m.sh("rm -r /run/systemd/system/nbd-pool.service.d && systemctl daemon-reload")
    # Nothing listens on port 9: the loopback answers "refused"; the unit's BPF firewall drops the SYN to
    # the other address (the connect times out), which outside the unit is refused just the same.
    assert result == ["127.0.0.1 ECONNREFUSED", "192.0.2.1 dropped"], result
    outside = m.run("python3", "-c", FIREWALL_PROBE.replace("/run/oma-firewall-probe", "/run/oma-probe-outside"))
    assert outside.returncode == 0
    assert m.run("cat", "/run/oma-probe-outside").stdout.splitlines()[1] == "192.0.2.1 ECONNREFUSED"


def test_journal_has_omads_log_and_not_the_password(installed: Machine) -> None:
    m = installed
    log = m.run("journalctl", "-b", "-u", "omad", "--no-pager", "-o", "cat").stdout
    assert "applied migration 0001_foundation" in log
    assert "listening on http://127.0.0.1:8082" in log
    assert admin_password(m) not in m.run("journalctl", "-b", "--no-pager", "-o", "cat").stdout


# -- the real work, under the hardened units -------------------------------------------------------------


@pytest.fixture(scope="module")
def appliance(installed: Machine, tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]) -> Appliance:
    """The simulator inside the container with a 2-disk VM (disk 0: GPT with two ext4, built on the host),
    the VM added, and two local repositories below the out-of-the-box /var/lib/oma/repositories."""
    t0 = time.monotonic()
    m = installed
    wait_healthy(m)
    m.start_devnodes()  # loop device nodes, as the appliance's devtmpfs makes them (restore mounts)
    # A port range of its own, as an operator's drop-ins set it: an nbd-pool on the host older than its
    # namespace check (other checkouts on a shared machine) takes any qemu-nbd on its own range for its
    # leftovers, the container's included, and stops it at its start.
    m.sh("printf 'port_min = 10300\\nport_max = 10399\\n' > /etc/oma/nbd-pool.d/60-ports.toml && "
         "printf '[enrollment]\\nnbd_port_first = 10300\\nnbd_port_last = 10399\\n' > /etc/oma/omad.d/60-ports.toml"
         " && systemctl restart nbd-pool omad")
    wait_healthy(m)
    tmp = tmp_path_factory.mktemp("e2e-sources")
    disk0 = gpt_two_ext4(tmp / "disk0.raw", E2E_ROOT_TREE, E2E_DATA_TREE, size=64 * MiB)
    disk1 = tmp / "disk1.raw"
    with open(disk1, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(MiB)
        f.write(random.Random(1).randbytes(3 * MiB))
    a = Appliance(m, admin_password(m))
    a.install_simulator([disk0.path, disk1])
    a.disk0 = disk0  # type: ignore[attr-defined]
    a.login()
    a.call("POST", "/vmware-credentials", {"credential_name": "sim", "vcenter_host": VCENTER["host"],
                                            "username": VCENTER["username"], "password": VCENTER["password"],
                                            "datacenter": "DC1", "is_default": True}, expect=(200, 201))
    _, body = a.call("POST", "/discovery/add-vms", {"vcenter": VCENTER["host"], "username": VCENTER["username"],
                                                     "password": VCENTER["password"], "datacenter": "DC1",
                                                     "vm_names": [VM]}, expect=200)
    assert body["vms_added"] == 1, body
    m.run("runuser", "-u", "oma", "--", "mkdir", "/var/lib/oma/repositories/main",
          "/var/lib/oma/repositories/second")
    for name in ("main", "second"):
        _, repo = a.call("POST", "/repositories", {"name": name, "type": "local",
                                                   "config": {"disk_path": f"/var/lib/oma/repositories/{name}"}},
                         expect=201)
        a.repos[name] = repo["id"]
    # Outside nbd-pool's export roots: refused at creation, naming the roots and the drop-in.
    m.run("runuser", "-u", "oma", "--", "mkdir", "/var/lib/oma/elsewhere")
    _, body = a.call("POST", "/repositories", {"name": "elsewhere", "type": "local",
                                               "config": {"disk_path": "/var/lib/oma/elsewhere"}}, expect=400)
    assert "/var/lib/oma/repositories" in body["details"] and "/etc/oma/nbd-pool.d/*.toml" in body["details"], body
    timings["e2e set-up"] = time.monotonic() - t0
    return a


def restart_services(a: Appliance, services: tuple[str, ...], pids: frozenset[str] = frozenset()) -> None:
    """`systemctl restart` of each of `services`; the processes `pids` (exports) outlive every one."""
    for s in services:
        a.m.run("systemctl", "restart", f"{s}.service")
        if pids:
            alive = a.alive(set(pids))
            assert alive == pids, f"{sorted(pids - alive)} did not outlive a restart of {s}:\n{a.journal('nbd-pool')}"
    wait_healthy(a.m)
    a.login()  # sessions survive omad, but a fresh one costs nothing


def test_full_and_incremental_backups_of_a_two_disk_vm(appliance: Appliance, timings: dict[str, float]) -> None:
    a = appliance
    t0 = time.monotonic()
    full = a.wait_backup(a.start_backup(a.repos["main"], "full"))
    a.assert_same_as_sources(full)
    assert all(d["qcow2_path"].startswith("/var/lib/oma/repositories/main/") for d in full["disk_results"])
    timings["e2e full backup"] = time.monotonic() - t0
    ext4_modify(a.source(0), a.disk0.partition(1).offset, add={"etc/motd": b"changed\n"})  # type: ignore[attr-defined]
    with open(a.source(1), "r+b") as f:
        f.seek(20 * MiB)
        f.write(random.Random(2).randbytes(MiB))
    inc = a.wait_backup(a.start_backup(a.repos["main"], "incremental"))
    a.assert_same_as_sources(inc)
    assert inc["parent_backup_id"] == full["backup_id"] and all(d["backing_file"] for d in inc["disk_results"])
    a.inc = inc  # type: ignore[attr-defined]


def test_a_backup_survives_restarts_of_every_service(appliance: Appliance) -> None:
    a = appliance
    with open(a.source(1), "r+b") as f:
        f.seek(12 * MiB)
        f.write(random.Random(4).randbytes(MiB))
    bid = a.start_backup(a.repos["main"], "incremental", held=True)
    exports = frozenset(a.export_pids(bid))
    assert len(exports) == 2, exports
    try:
        restart_services(a, SERVICES, exports)
        assert a.call("GET", f"/backups/{bid}", expect=200)[1]["status"] == "running"
    finally:
        a.release()
        done = a.wait_backup(bid)  # completed, or failed with the reason: never left running
    a.assert_same_as_sources(done)


def test_restore_mount_lists_and_downloads_and_survives_restarts(appliance: Appliance) -> None:
    a = appliance
    # Bound in from the host (nspawn_box.DEVICES) where it has them; the restore attach needs both. Only the
    # host's lack skips: a host that has them and a container that lacks them is a failed bind, not a skip.
    if not all(os.path.exists(d) for d in nspawn_box.DEVICES):
        pytest.skip("the host has no /dev/fuse or /dev/loop-control to give the container")
    assert a.m.run("test", "-c", "/dev/fuse", "-a", "-c", "/dev/loop-control", check=False).returncode == 0, \
        "the host's /dev/fuse and /dev/loop-control did not reach the container"
    _, mount = a.call("POST", "/restore/mount", {"backup_id": a.inc["backup_id"], "disk_index": 0},  # type: ignore[attr-defined]
                      expect=201)
    mid = mount["mount_id"]
    want = hashlib.sha256(b"".join(E2E_DATA.chunks())).hexdigest()

    def check() -> None:
        _, top = a.call("GET", f"/restore/{mid}/files", expect=200)
        assert [f["name"] for f in top["files"]] == ["part1", "part2"], top
        out = a.call("GET", f"/restore/{mid}/download?path=/part1/var/lib/app/data.bin", save=True)
        assert out["status"] == 200 and out["body"] == want, out
        out = a.call("GET", f"/restore/{mid}/download?path=/part1/etc/motd", save=True)
        assert out["body"] == hashlib.sha256(b"changed\n").hexdigest(), out

    check()
    # What must outlive the restarts (KillMode=process, docs/architecture.md): the attachment's
    # qemu-storage-daemon, and the mounts themselves (the same mount ids, not new ones).
    attachment = frozenset(pids_by_program(a.m, "qemu-storage-daemon"))
    assert len(attachment) == 1, attachment
    mounts = a.m.run("python3", "-c", MOUNT_IDS, "/var/lib/oma-agents/").stdout
    assert mounts.strip(), a.m.run("cat", "/proc/self/mountinfo").stdout
    restart_services(a, SERVICES, attachment)
    assert a.m.run("python3", "-c", MOUNT_IDS, "/var/lib/oma-agents/").stdout == mounts
    check()  # and restore-mounter and omad re-adopted it
    a.call("DELETE", f"/restore/{mid}", expect=200)
    deadline = time.monotonic() + 10
    while pids_by_program(a.m, "qemu-storage-daemon"):  # the attachment goes with the mount
        assert time.monotonic() < deadline, a.journal("nbd-pool")
        time.sleep(0.2)


def test_a_copy_lands_in_the_second_repository(appliance: Appliance) -> None:
    a = appliance
    _, out = a.call("POST", f"/backups/{a.inc['backup_id']}/copy", {"repository_id": a.repos["second"]},  # type: ignore[attr-defined]
                    expect=(200, 201, 202))
    deadline = time.monotonic() + 120
    while (copy := a.call("GET", f"/copies/{out['copy_id']}", expect=200)[1])["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, copy
        time.sleep(0.5)
    assert copy["status"] == "completed", (copy, a.journal("omad"))
    _, listing = a.call("GET", f"/backups?repository_id={a.repos['second']}", expect=200)  # type: ignore[attr-defined]
    copied = [b for b in listing["backups"] if b["status"] == "completed"]
    assert copied, listing
    top = max(copied, key=lambda b: b["created_at"])
    for d, src in zip(top["disk_results"], a.inc["disk_results"]):  # type: ignore[attr-defined]
        assert d["qcow2_path"].startswith("/var/lib/oma/repositories/second/")
        assert a.image_sha(d["qcow2_path"]) == a.image_sha(src["qcow2_path"])  # reads as the copied backup


def test_a_policy_copies_its_backup_into_the_second_repository(appliance: Appliance) -> None:
    """A policy's immediate copy rule: the backup lands in main, its copy in second, with the same content."""
    a = appliance
    _, policy = a.call("POST", "/policies", {"name": "3-2-1", "primary_repository_id": a.repos["main"],
                                              "retention_days": 30,
                                              "copy_rules": [{"destination_repository_id": a.repos["second"]}]},
                       expect=201)
    _, body = a.call("POST", "/backups", {"vm_name": VM, "repository_id": a.repos["main"], "backup_type": "full",
                                          "policy_id": policy["id"]}, expect=200)
    done = a.wait_backup(str(body["backup_id"]))
    a.assert_same_as_sources(done)
    deadline = time.monotonic() + 120
    while True:
        copies = a.call("GET", f"/backups/{done['backup_id']}/copies", expect=200)[1]
        assert not [c for c in copies if c["status"] == "failed"], (copies, a.journal("omad"))
        if copies and all(c["status"] == "completed" for c in copies):
            break
        assert time.monotonic() < deadline, (copies, a.journal("omad"))
        time.sleep(0.5)
    assert [c["repository_id"] for c in copies] == [a.repos["second"]], copies
    _, copy = a.call("GET", f"/backups/{copies[0]['copy_backup_id']}", expect=200)
    for d, src in zip(copy["disk_results"], done["disk_results"]):
        assert d["qcow2_path"].startswith("/var/lib/oma/repositories/second/")
        assert a.image_sha(d["qcow2_path"]) == a.image_sha(src["qcow2_path"])


def test_an_immutable_repository_locks_the_backup_until_it_ends(appliance: Appliance) -> None:
    a = appliance
    m = a.m
    m.run("runuser", "-u", "oma", "--", "mkdir", "/var/lib/oma/repositories/vault")
    _, vault = a.call("POST", "/repositories", {"name": "vault", "type": "local", "is_immutable": True,
                                                "min_retention_days": 7,
                                                "config": {"disk_path": "/var/lib/oma/repositories/vault"}},
                      expect=201)
    bid = a.start_backup(vault["id"], "full")
    done = a.wait_backup(bid)
    a.assert_same_as_sources(done)
    files = [d["qcow2_path"] for d in done["disk_results"]]
    deadline = time.monotonic() + 30
    while not all("i" in m.run("lsattr", "-d", f).stdout.split()[0] for f in files):
        assert time.monotonic() < deadline, (m.run("lsattr", *files).stdout, a.journal("volume-agent"))
        time.sleep(0.5)
    status, body = a.call("DELETE", f"/backups/{bid}")
    assert status == 409 and body.get("unlock_at"), body
    assert m.run("rm", "-f", files[0], check=False).returncode != 0  # not even root inside
    # The lock ends (moved into the past here): deletion unlocks the files and removes them.
    m.run("runuser", "-u", "oma", "--", "python3", "-c",
          "import sqlite3, sys; c = sqlite3.connect('/var/lib/oma/oma.db'); "
          "c.execute(\"UPDATE backup_jobs SET locked_until = '2000-01-01T00:00:00.000Z' WHERE backup_id = ?\", "
          "(sys.argv[1],)); c.commit()", bid)
    a.call("DELETE", f"/backups/{bid}", expect=200)
    for f in files:
        assert m.run("test", "-e", f, check=False).returncode == 1, f


def test_upgrade_keeps_the_database_and_users(installed: Machine, upgrade_deb: debbuild.DebBuild,
                                              appliance: Appliance, timings: dict[str, float]) -> None:
    m = installed
    password = admin_password(m)
    m.run("runuser", "-u", "oma", "--", "omactl", "user", "add", "alice", "--role", "operator",
          "--password-stdin", input="alice-password\n")
    pids = {s: prop(m, f"{s}.service", "MainPID") for s in SERVICES}
    # A backup runs through the upgrade: its exports outlive the restarts, the new omad re-adopts it.
    a = appliance
    with open(a.source(1), "r+b") as f:
        f.seek(10 * MiB)
        f.write(random.Random(3).randbytes(MiB))
    bid = a.start_backup(a.repos["main"], "incremental", held=True)
    exports = a.export_pids(bid)
    assert len(exports) == 2, exports
    t0 = time.monotonic()
    p = m.run("apt-get", "install", "--no-install-recommends", "-y", "-q", f"/root/{upgrade_deb.deb.name}",
              timeout=300, check=False)
    timings["upgrade"] = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    survived = a.alive(exports)
    wait_healthy(m)
    a.login()
    a.release()
    backup = a.wait_backup(bid)
    assert survived == exports, (f"{sorted(exports - survived)} did not outlive the upgrade", a.journal("nbd-pool"))
    assert m.run("dpkg-query", "-W", "-f", "${Version}", "oma-appliance").stdout == upgrade_deb.version
    for s in SERVICES:  # restarted onto the new code, and running
        assert prop(m, f"{s}.service", "ActiveState") == "active", s
        assert prop(m, f"{s}.service", "MainPID") != pids[s], f"{s} was not restarted by the upgrade"
    wait_healthy(m)
    assert admin_password(m) == password
    assert login(m, "admin", password)[0] == 200
    assert login(m, "alice", "alice-password")[0] == 200
    users = [json.loads(line)["username"] for line in m.run("omactl", "user", "list", "--json").stdout.splitlines()]
    assert users == ["admin", "alice"]
    a.assert_same_as_sources(backup)


def test_remove_keeps_data_and_purge_removes_state_and_user(installed: Machine) -> None:
    m = installed
    # A leftover child in nbd-pool's cgroup, as a live export would be: removal must end it.
    m.sh("mkdir -p /run/systemd/system/nbd-pool.service.d && printf '[Service]\\nExecStartPost=/bin/sh -c "
         "\"sleep 3602 >/dev/null 2>&1 &\"\\n' > /run/systemd/system/nbd-pool.service.d/child.conf && "
         "systemctl daemon-reload && systemctl restart nbd-pool")
    removal = m.run("apt-get", "remove", "-y", "-q", "oma-appliance", timeout=120)
    for s in (*SERVICES, "oma"):
        unit = f"{s}.target" if s == "oma" else f"{s}.service"
        assert prop(m, unit, "ActiveState") in ("inactive", ""), unit
    left = pids_of(m, "sleep", "3601") + pids_of(m, "sleep", "3602")
    assert not left, ("nbd-pool's children survived removal", prop(m, "nbd-pool.service", "ControlGroup"),
                      m.run("cat", *(f"/proc/{p}/cgroup" for p in left), check=False).stdout, removal.stdout[-1500:],
                      removal.stderr[-1500:])
    m.run("test", "-s", "/var/lib/oma/oma.db")
    m.run("test", "-s", "/etc/oma/omad.d/50-local.toml")
    m.run("getent", "passwd", "oma")
    m.sh("rm -r /run/systemd/system/nbd-pool.service.d")
    m.run("apt-get", "purge", "-y", "-q", "oma-appliance", timeout=120)
    for path in ("/var/lib/oma", "/var/lib/oma-agents", "/etc/oma", "/run/oma", "/lib/systemd/system/omad.service",
                 "/etc/systemd/system/multi-user.target.wants/oma.target"):
        assert m.run("test", "-e", path, check=False).returncode == 1, f"{path} survived the purge"
    assert m.run("getent", "passwd", "oma", check=False).returncode == 2
    assert m.run("getent", "group", "oma", check=False).returncode == 2
    assert m.run("getent", "passwd", "vma_tunnel", check=False).returncode == 2
    assert m.run("test", "-e", "/etc/ssh/sshd_config.d/oma-vma-tunnel.conf", check=False).returncode == 1
    status = m.run("dpkg-query", "-W", "-f", "${db:Status-Status}", "oma-appliance", check=False)
    assert status.stdout in ("", "not-installed")
