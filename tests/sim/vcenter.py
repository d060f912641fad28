"""A real vCenter for tests: builds and supervises tests/sim/vcsim, reads its inventory with pyvmomi."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import selectors
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Sequence

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "vcsim"
REPO_ROOT = Path(__file__).resolve().parents[2]
GOPATH_SYSTEM = "/usr/share/gocode"  # golang-github-vmware-govmomi-dev installs govmomi here
BUILD_TIMEOUT = 600.0  # a cold build takes ~25 s on 2 cores
GIB = 1024**3


class VCenterSimError(RuntimeError):
    """The simulator could not be built, started or stopped."""


def cache_dir() -> Path:
    """Where the binary and Go's caches live: $OMA_CACHE_DIR/vcsim, else <repo>/.cache/vcsim."""
    base = os.environ.get("OMA_CACHE_DIR")
    return (Path(base) if base else REPO_ROOT / ".cache") / "vcsim"


def build_vcsim() -> Path:
    """Build the simulator unless the binary is newer than main.go; return the binary's path."""
    source = SOURCE_DIR / "main.go"
    out_dir = cache_dir()
    binary = out_dir / "vcsim"
    out_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test runs share the cache); the others wait, then reuse.
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
            return binary
        go = shutil.which("go") or "/usr/lib/go/bin/go"
        env = dict(os.environ)
        env.update(
            GO111MODULE="off",  # offline: govmomi comes from the distribution's GOPATH tree
            GOPATH=f"{out_dir / 'gopath'}:{GOPATH_SYSTEM}",
            GOFLAGS="",
        )
        env.setdefault("GOCACHE", str(out_dir / "go-build"))
        partial = out_dir / f"vcsim.{os.getpid()}.tmp"
        log.info("building %s -> %s", source, binary)
        started = time.monotonic()
        try:
            result = subprocess.run(
                [go, "build", "-o", str(partial), "."],
                cwd=SOURCE_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            partial.unlink(missing_ok=True)
            raise VCenterSimError(f"go build failed: {exc}") from exc
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise VCenterSimError(f"go build failed ({result.returncode}):\n{result.stderr}")
        os.replace(partial, binary)  # atomic: a concurrent reader never sees half a binary
        log.info("built %s in %.1f s", binary, time.monotonic() - started)
        return binary


@dataclasses.dataclass(frozen=True)
class VMSpec:
    """One extra VM for the simulator's -vm flag; names may hold spaces, unicode and '/'."""

    name: str
    disks: int = 1  # on one pvscsi controller, keys 2000, 2001, ...; at most 15
    disk_gb: int = 1  # every disk; the backing files stay empty
    nics: int = 1  # NIC i: network ["VM Network", "DC0_DVPG0"][i % 2], adapter ["vmxnet3", "e1000e", "e1000"][i % 3]
    cpus: int = 1
    memory_mb: int = 1024
    guest_id: str = "otherLinux64Guest"
    provisioning: str = "thin"  # thin | thick | eagerZeroedThick
    power_on: bool = False

    def to_flag(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class VCenterSim:
    """One supervised vcsim process; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        *,
        username: str = "administrator@vsphere.local",
        password: str = "vcsim",
        port: int = 0,
        vms: Sequence[VMSpec] = (),
        default_vms: bool = True,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self._port = port
        self._vms = list(vms)
        self._default_vms = default_vms
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._cert = (cert_file, key_file) if cert_file is not None and key_file is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self.url = ""
        self.host = ""  # "127.0.0.1:PORT", as the VMA's discover call takes it
        self.port = 0
        self.returncode: int | None = None
        self.leftovers: list[str] = []  # names in the child's TMPDIR after it exited

    def argv(self, binary: Path) -> list[str]:
        argv = [str(binary), "-port", str(self._port), "-username", self.username, "-password", self.password]
        argv.append(f"-default-vms={'true' if self._default_vms else 'false'}")
        if self._cert is not None:  # served instead of Go's self-signed test certificate
            argv += ["-cert", str(self._cert[0]), "-key", str(self._cert[1])]
        for spec in self._vms:
            argv += ["-vm", spec.to_flag()]
        return argv

    def start(self) -> VCenterSim:
        if self._proc is not None:
            raise VCenterSimError("already started")
        binary = build_vcsim()
        self._workdir = Path(tempfile.mkdtemp(prefix="vcsim-"))
        # The datastores are temp dirs: keep them in our work dir so that a killed child leaves nothing.
        env = dict(os.environ, TMPDIR=str(self._workdir))
        with open(self._workdir / "stderr.log", "wb") as stderr:
            self._proc = subprocess.Popen(
                self.argv(binary), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env
            )
        log.info("vcsim pid %d starting", self._proc.pid)
        try:
            info = json.loads(self._read_ready_line())
            self.url = info["url"]
            self.host = self.url.split("/")[2]
            self.port = int(self.host.rsplit(":", 1)[1])
        except BaseException:
            self.stop()
            raise
        log.info("vcsim pid %d ready at %s", self._proc.pid, self.url)
        return self

    @property
    def thumbprint(self) -> str:
        """The SHA-256 thumbprint (AA:BB:...) of the certificate the simulator serves, as a pin takes it."""
        digest = hashlib.sha256(self.certificate_der()).hexdigest().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))

    def certificate_der(self) -> bytes:
        """The certificate the simulator presents, read without trusting it."""
        context = _unverified_context()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True) or b""

    def _read_ready_line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self._start_timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VCenterSimError(f"vcsim not ready after {self._start_timeout} s: {self.stderr_text()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:  # EOF: the child exited (its stderr says why)
                    code = self._proc.wait(timeout=self._stop_timeout)
                    raise VCenterSimError(f"vcsim exited with {code} before ready: {self.stderr_text()}")
                buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def stderr_text(self) -> str:
        if self._workdir is None:
            return ""
        try:
            return (self._workdir / "stderr.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """Terminate, wait, kill if needed; returns the exit code (0 after a clean SIGTERM)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("vcsim pid %d ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            self.returncode = proc.returncode
            log.info("vcsim pid %d exited with %s", proc.pid, proc.returncode)
        if self._workdir is not None:
            # A clean exit removes the datastore dirs; anything else here was left behind.
            self.leftovers = sorted(p.name for p in self._workdir.iterdir() if p.name != "stderr.log")
            if self.leftovers:
                log.warning("vcsim left %s behind", self.leftovers)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return self.returncode

    def __enter__(self) -> VCenterSim:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _unverified_context() -> ssl.SSLContext:
    # The simulator serves Go's self-signed test certificate. pyvmomi 6.7 (Debian 12) lacks
    # SmartConnect(disableSslCertValidation=...); an explicit context works with every version.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextlib.contextmanager
def connect(host: str, username: str, password: str) -> Iterator[vim.ServiceInstance]:
    """A logged-in ServiceInstance for "HOST:PORT"; raises vim.fault.InvalidLogin or OSError."""
    address, _, port = host.rpartition(":")
    si = SmartConnect(host=address, port=int(port), user=username, pwd=password, sslContext=_unverified_context())
    try:
        yield si
    finally:
        Disconnect(si)


def _collect(si: vim.ServiceInstance, kind: type, paths: list[str]) -> dict[str, dict[str, Any]]:
    """{moid: {path: value}} for every object of one type; only the named properties are read.

    The simulator fails the whole request on an unset property (vm.snapshot, say), so paths are
    explicit and unset optional ones come back missing rather than as None.
    """
    content = si.RetrieveContent()
    assert content.viewManager is not None and content.propertyCollector is not None
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[
                vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=paths, all=False)],
        )
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        found: dict[str, dict[str, Any]] = {}
        while result is not None:
            for obj in result.objects:
                found[obj.obj._moId] = {prop.name: prop.val for prop in obj.propSet or []}
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return found
    finally:
        view.Destroy()


VM_PATHS = [
    "name",
    "parent",
    "config.instanceUuid",
    "config.guestId",
    "config.guestFullName",
    "config.version",
    "config.hardware.memoryMB",
    "config.hardware.numCPU",
    "config.hardware.device",
    "runtime.powerState",
]


def inventory(sim: VCenterSim) -> list[dict[str, Any]]:
    """The simulator's VMs as the VMA's discover call returns them (docs CONTRACTS.md), sorted by path."""
    with connect(sim.host, sim.username, sim.password) as si:
        vms = _collect(si, vim.VirtualMachine, VM_PATHS)
        parents = _collect(si, vim.Folder, ["name", "parent"])
        parents.update(_collect(si, vim.Datacenter, ["name", "parent"]))
        datastores = {moid: props["name"] for moid, props in _collect(si, vim.Datastore, ["name"]).items()}
        portgroups = {
            props["key"]: props["name"]
            for props in _collect(si, vim.dvs.DistributedVirtualPortgroup, ["name", "key"]).values()
        }
        root = si.content.rootFolder._moId
    inventory = [_vm_dict(props, parents, root, datastores, portgroups) for props in vms.values()]
    return sorted(inventory, key=lambda vm: vm["path"])


def _vm_dict(
    props: dict[str, Any],
    parents: dict[str, dict[str, Any]],
    root: str,
    datastores: dict[str, str],
    portgroups: dict[str, str],
) -> dict[str, Any]:
    # Inventory path as govc and the VMA print it: /DC0/vm/NAME (the root folder is not named).
    names: list[str] = []
    datacenter = ""
    parent = props.get("parent")
    while parent is not None and parent._moId != root and parent._moId in parents:
        names.append(parents[parent._moId]["name"])
        if isinstance(parent, vim.Datacenter):
            datacenter = parents[parent._moId]["name"]
        parent = parents[parent._moId].get("parent")
    folder_path = "/" + "/".join(reversed(names))
    devices = props.get("config.hardware.device") or []
    guest_id = props.get("config.guestId", "")
    return {
        "id": props["config.instanceUuid"],
        "name": props["name"],  # as vCenter stores it: '/' is %2f, '%' is %25
        "display_name": props["name"],
        "path": f"{folder_path}/{props['name']}",
        "folder_path": folder_path,
        "datacenter": datacenter,
        "power_state": str(props["runtime.powerState"]),
        "guest_os": props.get("config.guestFullName") or guest_id,
        "os_type": _os_family(guest_id),
        "memory_mb": props["config.hardware.memoryMB"],
        "num_cpu": props["config.hardware.numCPU"],
        "cpus": props["config.hardware.numCPU"],
        "vmx_version": props.get("config.version", ""),
        "disks": [_disk_dict(d, datastores) for d in devices if isinstance(d, vim.vm.device.VirtualDisk)],
        "networks": [
            _nic_dict(d, portgroups) for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ],
    }


def _os_family(guest_id: str) -> str:
    guest = guest_id.lower()
    if guest.startswith("win"):
        return "windows"
    if any(word in guest for word in ("linux", "ubuntu", "debian", "rhel", "centos", "sles", "fedora", "oracle")):
        return "linux"
    return "other"


def _disk_dict(disk: vim.vm.device.VirtualDisk, datastores: dict[str, str]) -> dict[str, Any]:
    backing = disk.backing
    file_name = getattr(backing, "fileName", "") or ""
    # The simulator leaves capacityInBytes unset (None); capacityInKB is always there.
    capacity = disk.capacityInBytes or disk.capacityInKB * 1024
    datastore = getattr(backing, "datastore", None)
    if datastore is not None and datastore._moId in datastores:
        datastore_name = datastores[datastore._moId]
    else:
        datastore_name = file_name[1 : file_name.find("]")] if file_name.startswith("[") else ""
    # VirtualDiskManager.VirtualDiskType names.
    if getattr(backing, "thinProvisioned", False):
        provisioning = "thin"
    elif getattr(backing, "eagerlyScrub", False):
        provisioning = "eagerZeroedThick"
    else:
        provisioning = "thick"
    return {
        "id": f"disk-{disk.key}",
        "label": disk.deviceInfo.label if disk.deviceInfo else "",
        "path": file_name,
        "vmdk_path": file_name,
        "size_gb": math.ceil(capacity / GIB),  # rounded up: a target volume must hold the whole disk
        "capacity_bytes": capacity,
        "datastore": datastore_name,
        "provisioning_type": provisioning,
        "unit_number": disk.unitNumber,
    }


def _nic_dict(nic: vim.vm.device.VirtualEthernetCard, portgroups: dict[str, str]) -> dict[str, Any]:
    backing = nic.backing
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        key = backing.port.portgroupKey or ""
        kind, network = "distributed", portgroups.get(key, key)
    elif isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
        kind, network = "opaque", backing.opaqueNetworkId
    else:
        kind, network = "standard", getattr(backing, "deviceName", "") or ""
    # vim.vm.device.VirtualVmxnet3 -> "vmxnet3", VirtualE1000e -> "e1000e"
    adapter = type(nic).__name__.rsplit(".", 1)[-1].removeprefix("Virtual").lower()
    return {
        "label": nic.deviceInfo.label if nic.deviceInfo else "",
        "network_name": network,
        "adapter_type": adapter,
        "mac_address": nic.macAddress or "",
        "connected": bool(nic.connectable and nic.connectable.connected),
        "type": kind,
    }
