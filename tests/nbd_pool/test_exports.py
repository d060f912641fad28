"""Exports through the real nbd-pool over its socket, written and read by real NBD clients."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from nbd_pool.adapters.qemu_nbd import ExportOptions
from nbd_pool.exports import Exports, StartRequest
from nbd_pool.pool import Pool as DomainPool
from nbd_pool.roots import Roots
from oma_common.statefile import Damaged, StateFile

from ..lib.filetree import path_sha256
from ..lib.gate import Gate, cancel_inside, children, open_fds
from .helpers import MIB, Pool, ash, make_source, sha256_of_image, sh, url, vouch

pytestmark = [pytest.mark.timeout(120)]


async def test_64_mib_written_with_qemu_img_and_nbdcopy_reads_back_identical(pool: Pool) -> None:
    src = make_source(pool.stack.state / "src.raw", 64 * MIB)
    a = await pool.export("job-w1", pool.image("a.qcow2"), "vm1-disk-2000")
    b = await pool.export("job-w1", pool.image("b.qcow2"), "vm1-disk-2001")
    assert a["status"] == "running" and a["size"] == 64 * MIB and a["shared_limit"] == 10
    await ash("qemu-img", "convert", "-n", "-f", "raw", src, "-O", "raw", url(a["port"], a["export_name"]))
    await ash("nbdcopy", src, url(b["port"], b["export_name"]))
    # Read back through the exports while they run...
    for e in (a, b):
        await ash("qemu-img", "compare", "-f", "raw", "-F", "raw", src, url(e["port"], e["export_name"]))
    released = await pool.agent.ok("POST", "/jobs/job-w1/release")
    assert released["stopped_exports"] == 2 and released["released_count"] == 2
    # ...and from the images once qemu-nbd has flushed and gone.
    want = path_sha256(src)
    assert sha256_of_image(pool.repo / "a.qcow2", "qcow2", pool.stack.state) == want
    assert sha256_of_image(pool.repo / "b.qcow2", "qcow2", pool.stack.state) == want
    # The zeros written as data were not allocated in the backup (detect-zeroes=unmap).
    used = os.stat(pool.repo / "a.qcow2").st_blocks * 512
    assert used < 40 * MIB, used


async def test_two_clients_at_once(pool: Pool) -> None:
    e = await pool.export("job-2c", pool.image("two.qcow2", "8M"), "two")
    target = url(e["port"], "two")
    # Two qemu-io sessions hold their connections open at the same time.
    clients = [await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", target, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
               for _ in range(2)]
    try:
        for _ in range(100):
            listed = (await pool.agent.ok("GET", "/exports"))["processes"]
            if listed[0]["connection_count"] >= 2:
                break
            await asyncio.sleep(0.05)
        assert listed[0]["connection_count"] == 2, listed
        assert len(listed[0]["clients"]) == 2
        for i, c in enumerate(clients):
            assert c.stdin is not None
            c.stdin.write(f"write -P 0x{i + 1:02x} {i * MIB} {MIB}\nquit\n".encode())
            await c.stdin.drain()
            c.stdin.close()  # qemu-io reads a pipe to its end before it runs the commands
        outs = [await asyncio.wait_for(c.communicate(), 30) for c in clients]
        assert all(c.returncode == 0 for c in clients), outs
        assert all(b"wrote 1048576/1048576 bytes" in o[0] for o in outs), outs
    finally:
        for c in clients:
            if c.returncode is None:
                c.kill()
                await c.wait()
    for i in range(2):
        res = await ash("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x{i + 1:02x} {i * MIB} {MIB}", target)
        assert b"Pattern verification failed" not in res.stdout, res.stdout


async def test_read_only_export_refuses_writes(pool: Pool) -> None:
    image = pool.image("ro.qcow2", "8M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", image)
    e = await pool.export("job-ro", image, "ro", read_only=True)
    assert e["read_only"] is True
    target = url(e["port"], "ro")
    res = await ash("qemu-io", "-f", "raw", "-c", "write -P 0x00 0 1M", target, check=False)
    assert res.returncode != 0 or b"write failed" in res.stdout + res.stderr, res
    assert b"wrote" not in res.stdout
    src = make_source(pool.stack.state / "ro-src.raw", 2 * MIB)
    clients: list[list[str | Path]] = [["qemu-img", "convert", "-n", "-f", "raw", src, "-O", "raw", target],
                                       ["nbdcopy", src, target]]
    for client in clients:
        res = await ash(*client, check=False)
        assert res.returncode != 0, (client, res)
    ok = await ash("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", target)
    assert b"Pattern verification failed" not in ok.stdout


@pytest.mark.root
async def test_block_device_behind_a_root_only_link_is_exported_raw(pool: Pool) -> None:
    """The replication path: a volume's /dev/disk/by-id-style link in a root-only directory, exported raw."""
    backing = pool.stack.state / "volume.raw"
    with open(backing, "wb") as f:
        f.truncate(16 * MIB)
    device = sh("losetup", "--show", "-f", backing).stdout.decode().strip()
    try:
        links = pool.repo / "by-id"
        links.mkdir(mode=0o755)
        (links / "virtio-vol1").symlink_to(device)
        # A hand-made link to a device volume-agent did not attach is refused...
        alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-rep0", "count": 1})
        status, body = await pool.agent.post("/exports", {"export_name": "vol0", "port": alloc["allocated_ports"][0]["port"],
                                                          "path": str(links / "virtio-vol1")})
        assert status == 400 and body["error"] == "block device not vouched for", body
        # ...and accepted once volume-agent's registry lists it.
        vouch(pool.stack.state / "volume-agent" / "vouched.json", (device, links / "virtio-vol1"))
        e = await pool.export("job-rep", links / "virtio-vol1", "vol1")
        assert e["format"] == "raw" and e["resolved_path"] == device and e["path"] == str(links / "virtio-vol1")
        src = make_source(pool.stack.state / "vol-src.raw", 16 * MIB, seed=7)
        await ash("nbdcopy", src, url(e["port"], "vol1"))
        await pool.agent.ok("POST", "/jobs/job-rep/release")
        assert path_sha256(Path(device)) == path_sha256(src)
        # The same link in a directory others may write to is not followed to the device.
        os.chmod(links, 0o777)
        alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-rep2", "count": 1})
        status, body = await pool.agent.post("/exports", {"export_name": "vol1", "port": alloc["allocated_ports"][0]["port"],
                                                          "path": str(links / "virtio-vol1")})
        assert status == 400 and body["error"] == "path outside the export roots", body
    finally:
        sh("losetup", "-d", device)


async def test_stop_by_name_and_by_pid_keeps_the_lease(pool: Pool) -> None:
    one = await pool.export("job-s", pool.image("s1.qcow2", "4M"), "s1")
    two = await pool.export("job-s", pool.image("s2.qcow2", "4M"), "s2")
    assert await pool.agent.ok("POST", "/exports/stop", {"export_name": "s1"}) == {"success": True, "stopped_pid": one["pid"]}
    assert await pool.agent.ok("POST", "/exports/stop", {"pid": two["pid"]}) == {"success": True, "stopped_pid": two["pid"]}
    assert (await pool.agent.ok("GET", "/exports"))["processes"] == []
    status, body = await pool.agent.post("/exports/stop", {"export_name": "s1"})
    assert status == 404 and body["code"] == "not_found"
    # The ports are still the job's: the export can start again on the same port.
    leases = (await pool.agent.ok("GET", "/ports/status"))["allocations"]
    assert sorted(x["port"] for x in leases) == sorted([one["port"], two["port"]])
    again = await pool.export("job-s", pool.repo / "s1.qcow2", "s1", port=one["port"])
    assert again["port"] == one["port"] and again["pid"] != one["pid"]


async def test_conflicts_on_a_busy_port_name_or_image(pool: Pool) -> None:
    image = pool.image("c.qcow2", "4M")
    first = await pool.export("job-c", image, "c1")
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-c", "count": 1})
    free_port = alloc["allocated_ports"][0]["port"]
    other = pool.image("c2.qcow2", "4M")
    cases = [
        ({"export_name": "c2", "port": first["port"], "path": str(other)}, "port busy"),
        ({"export_name": "c1", "port": free_port, "path": str(other)}, "export name in use"),
        ({"export_name": "c2", "port": free_port, "path": str(image)}, "image already exported"),
        ({"export_name": "c2", "port": free_port, "path": str(other), "job_id": "job-other"}, "port leased to another job"),
    ]
    for body, error in cases:
        status, out = await pool.agent.post("/exports", body)
        assert out["error"] == error, (body, out)
        assert status == (400 if error == "port leased to another job" else 409), out


async def test_a_leased_port_a_stranger_binds_is_a_clear_409_and_its_lease_is_freed(pool: Pool) -> None:
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-t", "count": 2})
    taken, kept = (a["port"] for a in alloc["allocated_ports"])
    stranger = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", taken)
    async with stranger:
        status, out = await pool.agent.post("/exports", {"export_name": "t", "port": taken, "job_id": "job-t",
                                                         "path": str(pool.image("t.qcow2", "4M"))})
    assert status == 409 and out["error"] == "port held by another process", out
    assert f"port {taken} is bound by a process that is not an nbd-pool export" in out["details"], out
    leases = (await pool.agent.ok("GET", "/ports/status"))["allocations"]
    assert [x["port"] for x in leases] == [kept]  # the other lease of the job is untouched
    assert (await pool.agent.ok("GET", "/exports"))["processes"] == []


async def test_invalid_requests_are_400_json(pool: Pool) -> None:
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-v", "count": 1})
    port = alloc["allocated_ports"][0]["port"]
    good = pool.image("good.qcow2", "4M")
    outside = pool.stack.state / "outside.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", outside, "4M")
    (pool.repo / "escape.qcow2").symlink_to(outside)
    (pool.repo / "sub").mkdir()
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", outside, "-F", "qcow2", pool.repo / "sub" / "child.qcow2")
    # Headers rewritten as a compromised omad could (it owns the repositories): the backing names a host
    # file, or the image keeps its data in an external file.
    sh("qemu-img", "create", "-q", "-f", "qcow2", pool.repo / "shadow.qcow2", "4M")
    sh("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", pool.repo / "shadow.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={pool.repo / 'data.raw'}",
       pool.repo / "datafile.qcow2", "4M")
    # A header whose backing file name lies at an offset no file has (beyond what pread takes).
    sh("qemu-img", "create", "-q", "-f", "qcow2", pool.repo / "far.qcow2", "4M")
    with open(pool.repo / "far.qcow2", "r+b") as f:
        f.seek(8)
        f.write((2**63).to_bytes(8, "big") + (10).to_bytes(4, "big"))
    cases: dict[str, dict[str, Any]] = {
        "a backing file naming /etc/shadow": {"path": str(pool.repo / "shadow.qcow2")},
        "a backing file name past the end of any file": {"path": str(pool.repo / "far.qcow2")},
        "an external data file": {"path": str(pool.repo / "datafile.qcow2")},
        "outside the roots": {"path": str(outside)},
        "dot-dot out of a root": {"path": f"{pool.repo}/../outside.qcow2"},
        "a link out of a root": {"path": str(pool.repo / "escape.qcow2")},
        "a backing file outside the roots": {"path": str(pool.repo / "sub" / "child.qcow2")},
        "a directory": {"path": str(pool.repo)},
        "a relative path": {"path": "good.qcow2"},
        "a name with a slash": {"export_name": "vm/disk"},
        "a name with a space": {"export_name": "vm disk"},
        "a name with a leading dot": {"export_name": ".hidden"},
        "a port outside the range": {"port": pool.ports.stop},
        "a port below the range": {"port": pool.ports.start - 1},
        "a port not leased": {"port": port + 1 if port + 1 in pool.ports else port - 1},
        "too few connections": {"shared_connections": 2},
        "an unknown format": {"format": "vmdk"},
    }
    for what, override in cases.items():
        body = {"export_name": "ok-name", "port": port, "path": str(good), **override}
        status, out = await pool.agent.post("/exports", body)
        assert status == 400, (what, status, out)
        assert out["code"] == "invalid_request" and out["error"] and out["details"], (what, out)
    assert (await pool.agent.ok("GET", "/exports"))["processes"] == []
    status, out = await pool.agent.post("/exports", {"export_name": "x", "port": port,
                                                     "path": str(pool.repo / "missing.qcow2")})
    assert status == 404 and out["code"] == "not_found"


async def test_export_that_dies_is_dropped_by_the_periodic_check(make_pool: object) -> None:
    pool = await make_pool("reconcile_interval_seconds = 0.2\n")  # type: ignore[operator]
    e = await pool.export("job-d", pool.image("d.qcow2", "4M"), "d")
    os.kill(e["pid"], signal.SIGKILL)
    for _ in range(100):
        if not (await pool.agent.ok("GET", "/exports"))["processes"]:
            break
        await asyncio.sleep(0.05)
    assert (await pool.agent.ok("GET", "/exports"))["processes"] == []
    leases = (await pool.agent.ok("GET", "/ports/status"))["allocations"]
    assert [x["port"] for x in leases] == [e["port"]]  # the port stays with the job until it is released


async def test_a_racing_directory_swap_exports_nothing_outside_the_roots(pool: Pool) -> None:
    """A compromised omad exchanges a repository directory with a symlink to a directory outside the roots
    (renameat2 RENAME_EXCHANGE, in a loop) while export requests run for 10 s: every export serves the image
    inside the root (4 MiB) and never the one outside (8 MiB)."""
    import ctypes
    import threading
    import time

    ctx = pool.repo / "ctx"
    ctx.mkdir()
    sh("qemu-img", "create", "-q", "-f", "qcow2", ctx / "d.qcow2", "4M")
    outside = pool.stack.state / "outside"
    outside.mkdir()
    sh("qemu-img", "create", "-q", "-f", "qcow2", outside / "d.qcow2", "8M")
    (pool.repo / "ctx.link").symlink_to(outside)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        while not stop.is_set():
            assert libc.renameat2(-100, bytes(ctx), -100, bytes(pool.repo / "ctx.link"), 2) == 0
            flips[0] += 1
            time.sleep(0.0005)

    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-race", "count": 1})
    port = alloc["allocated_ports"][0]["port"]
    t = threading.Thread(target=flip)
    t.start()
    served = refused = 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, out = await pool.agent.post("/exports", {"export_name": "race", "port": port, "job_id": "job-race",
                                                             "path": str(ctx / "d.qcow2")})
            if status == 200:
                served += 1
                assert out["size"] == 4 * MIB, out
                await pool.agent.ok("POST", "/exports/stop", {"export_name": "race"})
            else:
                assert status in (400, 404, 409), (status, out)
                refused += 1
    finally:
        stop.set()
        t.join()
    assert flips[0] > 100 and served > 0 and refused > 0, (flips, served, refused)


async def test_a_start_cancelled_while_the_image_opens_leaves_nothing_open(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's task is cancelled (client gone, daemon stopping) while its thread opens the image chain:
    the descriptors the thread then returns are closed, no qemu-nbd is started, no name stays reserved."""
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("qemu-img", "create", "-q", "-f", "qcow2", repo / "base.qcow2", "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", repo / "top.qcow2")
    pool = DomainPool(StateFile(tmp_path / "leases.json", "leases", damaged=Damaged.REFUSE), port_min=10100,
                      port_max=10109, host="127.0.0.1", lease_seconds=3600, max_lease_seconds=86400,
                      port_free=lambda h, p: True)
    (lease,) = await pool.allocate("job-1", 1)
    exports = Exports(pool, Roots([str(repo)]), StateFile(tmp_path / "exports.json", "exports", damaged=Damaged.REFUSE),
                      bind_address="127.0.0.1", options=ExportOptions())
    before, kids = open_fds(), children()
    gate = Gate(exports.images.open_file)
    monkeypatch.setattr(exports.images, "open_file", gate)
    task = asyncio.create_task(exports.start(StartRequest("vm1-disk0", lease.port, str(repo / "top.qcow2"),
                                                          job_id="job-1")))
    await cancel_inside(gate, task)
    assert open_fds() == before and children() <= kids
    assert len(exports) == 0 and not exports._reserved and pool.lease(lease.port) is not None


async def test_nothing_outside_the_roots_is_looked_at_for_a_caller(pool: Pool) -> None:
    """A compromised omad probes the host through nbd-pool, which runs as root: whether a path outside the
    export roots exists, what it is, or where a link it planted in a repository leads must not show in the
    answer. Every such probe gets the same refusal, naming nothing it did not send."""
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-probe", "count": 1})
    port = alloc["allocated_ports"][0]["port"]
    private = pool.stack.state / "private"
    private.mkdir(mode=0o700)
    (private / "key").write_text("secret\n")
    os.chmod(private / "key", 0o600)
    (pool.repo / "to-key").symlink_to(private / "key")
    (pool.repo / "to-nothing").symlink_to(private / "nothing")
    (pool.repo / "to-private").symlink_to(private)
    (private / "into-repo").symlink_to(pool.repo / "nothing")  # outside as written, leads inside
    probes = {
        "an existing file": (private / "key", False),
        "a missing file": (private / "nothing", False),
        "a directory": (private, False),
        "a link outside that leads inside": (private / "into-repo", False),
        "a link to an existing file": (pool.repo / "to-key", True),
        "a link to a missing file": (pool.repo / "to-nothing", True),
        "through a linked directory, existing": (pool.repo / "to-private" / "key", True),
        "through a linked directory, missing": (pool.repo / "to-private" / "nothing", True),
    }
    answers = {}
    for what, (path, planted) in probes.items():
        status, body = await pool.agent.post("/exports", {"export_name": "probe", "port": port, "path": str(path),
                                                          "job_id": "job-probe"})
        answers[what] = (status, body["error"])
        if planted:
            assert str(private) not in body["details"], (what, body)
    assert set(answers.values()) == {(400, "path outside the export roots")}, answers


async def test_a_root_omad_replaced_with_a_link_before_a_restart_opens_nothing_through_it(pool: Pool) -> None:
    """The appliance's repository root lies in omad's own directory (/var/lib/oma/repositories in
    /var/lib/oma, owned by oma). A compromised omad replaces it with a symlink to a directory of root's and
    waits for nbd-pool to restart (a reboot, an upgrade): what the link leads to must not become the root,
    or a writable export of <root>/shadow would hand omad a root file."""
    oma = pool.stack.state / "oma"
    repos = oma / "repositories"
    repos.mkdir(parents=True)
    os.chown(oma, 65534, 65534)
    os.chown(repos, 65534, 65534)
    victim = pool.stack.state / "victim"
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_bytes(b"root:secret:\n".ljust(1024 * 1024, b"\0"))
    pool.stack.add_config("nbd-pool", "60-oma-root.toml", f'export_roots = ["{repos}"]\n')
    pool.stop()
    await pool.agent.close()
    os.rename(repos, oma / "repositories.old")  # as omad can: it owns the directory holding the root
    repos.symlink_to(victim)
    pool.start()
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-link", "count": 1})
    status, body = await pool.agent.post("/exports", {"export_name": "link", "port": alloc["allocated_ports"][0]["port"],
                                                      "path": str(repos / "shadow"), "format": "raw",
                                                      "job_id": "job-link"})
    assert status in (400, 404) and body["code"] in ("invalid_request", "not_found"), (status, body)
    assert (await pool.agent.ok("GET", "/exports"))["processes"] == []
    # The real directory at the root's name is used as before.
    repos.unlink()
    os.rename(oma / "repositories.old", repos)
    pool.stop()
    await pool.agent.close()
    pool.start()
    sh("qemu-img", "create", "-q", "-f", "qcow2", repos / "ok.qcow2", "4M")
    assert (await pool.export("job-ok", repos / "ok.qcow2", "ok"))["size"] == 4 * MIB
