"""The installed appliance doing real work, driven from the host: a VMA simulator inside the container (it
has a network namespace of its own: --private-network, so omad's 127.0.0.1 is the container's), source disks
built on the host and copied into its root, and the API called over HTTP from inside."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from nspawn_box import Machine

import debbuild

SIM_DIR = "/opt/vmasim"
CTL = SIM_DIR + "/ctl"  # on the container's root (its /run is a tmpfs the host does not see)
VM = "db 01"
VCENTER = {"host": "vcenter.sim.local", "datacenter": "DC1", "username": "administrator@vsphere.local",
           "password": "VMware1!"}

# Runs inside the container (its own python3 and aiohttp): the simulator, and a hold fault armed, reported
# and released through files in /opt/vmasim/ctl (the test cannot reach the simulator's memory).
DRIVER = f"""
import asyncio, json, pathlib, sys
sys.path.insert(0, {SIM_DIR!r})
from tests.sim.vma import SimState, VMASim
from tests.sim.vma.inventory import Inventory

CTL = pathlib.Path({CTL!r})

async def main():
    inv, sources = Inventory.from_dict_with_sources(json.loads(pathlib.Path({SIM_DIR!r}, "inventory.json").read_text()))
    state = SimState(inv, workdir={SIM_DIR!r} + "/work", oma_url="http://127.0.0.1:8082", telemetry_interval=0.5)
    for vm_id, index, path in sources:
        state.set_source(vm_id, index, path)
    CTL.mkdir(exist_ok=True)
    fault = None
    async with VMASim(state=state, host="127.0.0.1", port=9081):
        (CTL / "ready").touch()
        while True:
            if (CTL / "arm").exists():
                (CTL / "arm").unlink()
                fault = state.faults.hold_job(after_disks=1)
            if fault is not None and fault.held.is_set():
                (CTL / "held").touch()
            if (CTL / "release").exists():
                (CTL / "release").unlink()
                (CTL / "held").unlink(missing_ok=True)
                if fault is not None:
                    fault.release.set()
                    fault = None
            await asyncio.sleep(0.1)

asyncio.run(main())
"""

# One HTTP call from inside, writing the answer's body to a file (downloads) or printing status and JSON.
HTTP = """
import hashlib, json, sys, urllib.error, urllib.request
method, url, body, token, save = sys.argv[1:6]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Content-Type": "application/json",
                                      **({"Authorization": "Bearer " + token} if token else {})})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
if save:
    print(json.dumps({"status": status, "body": hashlib.sha256(raw).hexdigest(), "length": len(raw)}))
    sys.exit(0)
try:
    parsed = json.loads(raw)
except ValueError:
    parsed = raw[:300].decode(errors="replace")
print(json.dumps({"status": status, "body": parsed}))
"""

IMAGE_SHA = """
import hashlib, subprocess, sys, tempfile, os
with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
    raw = os.path.join(d, "x.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", sys.argv[1], raw], check=True)
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
print(h.hexdigest())
"""

ALIVE = """
import os, sys
for pid in sys.argv[1:]:
    try:
        os.kill(int(pid), 0)
        print(pid)
    except ProcessLookupError:
        pass
"""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Appliance:
    """The installed appliance in `m`, logged in as admin, with the simulator running inside."""

    def __init__(self, m: Machine, password: str) -> None:
        self.m = m
        self.password = password
        self.token = ""
        self.repos: dict[str, str] = {}

    def call(self, method: str, path: str, body: object = None, *, save: bool = False,
             expect: int | tuple[int, ...] | None = None) -> Any:
        p = self.m.run("python3", "-c", HTTP, method, "http://127.0.0.1:8082/api/v1" + path,
                       json.dumps(body) if body is not None else "", self.token, "1" if save else "", timeout=90)
        out = json.loads(p.stdout)
        if expect is not None:
            wanted = expect if isinstance(expect, tuple) else (expect,)
            assert out["status"] in wanted, (method, path, out)
        return out if save else (out["status"], out["body"])

    def login(self) -> None:
        status, body = self.call("POST", "/auth/login", {"username": "admin", "password": self.password})
        assert status == 200, body
        self.token = body["session_token"]

    # -- the simulator -------------------------------------------------------------------------------

    def install_simulator(self, sources: list[Path]) -> None:
        root = self.m.directory / SIM_DIR.lstrip("/")
        for pkg in ("tests", "tests/sim"):
            (root / pkg).mkdir(parents=True, exist_ok=True)
            shutil.copy(debbuild.REPO / pkg / "__init__.py", root / pkg / "__init__.py")
        shutil.copytree(debbuild.REPO / "tests/sim/vma", root / "tests/sim/vma",
                        ignore=shutil.ignore_patterns("__pycache__"))
        disks = []
        for i, src in enumerate(sources):
            shutil.copy(src, root / f"disk{i}.raw")
            disks.append({"source": f"{SIM_DIR}/disk{i}.raw", "capacity_bytes": src.stat().st_size})
        (root / "inventory.json").write_text(json.dumps({"vcenter": VCENTER,
                                                         "vms": [{"name": VM, "disks": disks}]}))
        (root / "driver.py").write_text(DRIVER)
        # As the user the VMA's SSH tunnel lands as: omad admits the machine routes (progress, completion)
        # from that user's loopback connections, as it does the real VMA's.
        self.m.run("install", "-d", "-o", "vma_tunnel", "-g", "vma_tunnel", f"{SIM_DIR}/work", CTL)
        self.m.run("systemd-run", "--unit=vmasim", "--collect", "-p", "KillMode=mixed", "-p", "User=vma_tunnel",
                   "/usr/bin/python3", f"{SIM_DIR}/driver.py")
        self.wait_file(f"{CTL}/ready", 30)

    def source(self, index: int) -> Path:
        return self.m.directory / SIM_DIR.lstrip("/") / f"disk{index}.raw"

    def wait_file(self, path: str, timeout: float) -> None:
        target = self.m.directory / path.lstrip("/")
        deadline = time.monotonic() + timeout
        while not target.exists():
            assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s\n" + self.journal("vmasim")
            time.sleep(0.1)

    def hold_next_backup(self) -> None:
        (self.m.directory / CTL.lstrip("/") / "arm").touch()

    def release(self) -> None:
        (self.m.directory / CTL.lstrip("/") / "release").touch()

    def journal(self, unit: str, lines: int = 40) -> str:
        return self.m.run("journalctl", "-u", unit, "--no-pager", "-n", str(lines), "-o", "cat", check=False).stdout

    # -- backups -------------------------------------------------------------------------------------

    def start_backup(self, repo_id: str, backup_type: str, *, held: bool = False) -> str:
        if held:
            self.hold_next_backup()
        _, body = self.call("POST", "/backups", {"vm_name": VM, "repository_id": repo_id,
                                                 "backup_type": backup_type}, expect=200)
        if held:
            self.wait_file(f"{CTL}/held", 60)
        return str(body["backup_id"])

    def wait_backup(self, backup_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, body = self.call("GET", f"/backups/{backup_id}", expect=200)
            if body["status"] in ("completed", "failed"):
                return body  # type: ignore[no-any-return]
            assert time.monotonic() < deadline, (body, self.journal("omad"))
            time.sleep(0.5)

    def image_sha(self, path: str) -> str:
        return self.m.run("python3", "-c", IMAGE_SHA, path, timeout=120).stdout.strip()

    def assert_same_as_sources(self, backup: dict[str, Any]) -> None:
        assert backup["status"] == "completed", (backup, self.journal("omad"), self.journal("nbd-pool"))
        for d in backup["disk_results"]:
            assert self.image_sha(d["qcow2_path"]) == sha256_file(self.source(d["disk_id"])), d

    def alive(self, pids: set[str]) -> set[str]:
        """Those of `pids` that still run in the container."""
        return set(self.m.run("python3", "-c", ALIVE, *sorted(pids)).stdout.split())

    def export_pids(self, backup_id: str) -> set[str]:
        _, body = self.call("GET", f"/backups/{backup_id}", expect=200)
        return {str(d["qemu_nbd_pid"]) for d in body["disk_results"] if d["qemu_nbd_pid"]}
