"""The systemd units, sysusers.d, tmpfiles.d and packaged drop-ins, checked without booting anything."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import units_check as uc  # beside this file; pytest puts this directory on sys.path (no __init__.py here)

REPO = uc.REPO
AGENTS = ("nbd-pool", "restore-mounter", "volume-agent")
DAEMON_MODULES = {"omad": "omad", "nbd-pool": "nbd_pool", "restore-mounter": "restore_mounter",
                  "volume-agent": "volume_agent"}

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (apt-get install systemd)")


def unit(name: str) -> dict[str, list[str]]:
    return uc.parse_unit(uc.UNIT_DIR / name)


def last(u: dict[str, list[str]], key: str) -> str | None:
    values = u.get(key)
    return values[-1] if values else None


def words(u: dict[str, list[str]], key: str) -> set[str]:
    return {w for v in u.get(key, []) for w in v.split()}


# -- systemd-analyze ------------------------------------------------------------------------------------


@needs_analyze
def test_every_unit_verifies_cleanly() -> None:
    with uc.scratch_root() as root:
        p = uc.verify(root)
    # verify exits 0 on unknown keys and unparsable values; only silence means the units are as meant.
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr


@needs_analyze
def test_verify_in_the_scratch_root_does_catch_a_broken_unit() -> None:
    """The check above can fail: a misspelt key and a missing program are both reported."""
    with uc.scratch_root() as root:
        broken = root / "usr/lib/systemd/system/omad.service"
        broken.write_text(broken.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")
                          .replace("ExecStart=/usr/bin/omad", "ExecStart=/usr/bin/omad-missing"))
        p = uc.verify(root, ("omad.service",))
    out = p.stdout + p.stderr
    assert "Unknown key 'NoNewPrivilege'" in out
    assert "/usr/bin/omad-missing" in out and p.returncode != 0


@needs_analyze
@pytest.mark.parametrize("service", uc.SERVICES)
def test_exposure_is_within_target(service: str) -> None:
    with uc.scratch_root() as root:
        exposure, table = uc.security(root, service)
    assert exposure <= uc.EXPOSURE_TARGETS[service], table


def test_omad_target_is_the_issues() -> None:
    assert uc.EXPOSURE_TARGETS["omad.service"] <= 2.0


# -- what the units promise ------------------------------------------------------------------------------


@pytest.mark.parametrize("service", uc.SERVICES)
def test_services_are_notify_restart_on_failure_and_part_of_the_target(service: str) -> None:
    u = unit(service)
    assert last(u, "Service.Type") == "notify"
    assert last(u, "Service.Restart") == "on-failure"
    assert "oma.target" in words(u, "Unit.PartOf")
    assert last(u, "Service.NoNewPrivileges") == "yes"
    assert last(u, "Service.SystemCallArchitectures") == "native"
    assert last(u, "Service.AmbientCapabilities") == ""
    assert u.get("Service.RestrictAddressFamilies") and u.get("Service.SystemCallFilter")


def test_target_wants_all_four_and_is_enabled_by_multi_user() -> None:
    t = unit("oma.target")
    assert words(t, "Unit.Wants") == set(uc.SERVICES)
    assert words(t, "Unit.After") == set(uc.SERVICES)
    assert words(t, "Install.WantedBy") == {"multi-user.target"}
    for service in uc.SERVICES:  # the target is the one switch: services have no [Install] of their own
        assert not any(k.startswith("Install.") for k in unit(service)), service


def test_omad_is_unprivileged_sandboxed_and_after_the_agents() -> None:
    u = unit("omad.service")
    assert last(u, "Service.User") == "oma"
    assert last(u, "Service.CapabilityBoundingSet") == ""
    assert last(u, "Service.ProtectSystem") == "strict"
    assert words(u, "Service.ReadWritePaths") == {"/var/lib/oma", "/srv/oma/repositories"}
    for key in ("PrivateTmp", "PrivateDevices", "ProtectHome", "ProtectKernelTunables", "RestrictNamespaces"):
        assert last(u, f"Service.{key}") == "yes", key
    agents = {f"{a}.service" for a in AGENTS}
    assert agents <= words(u, "Unit.After") and agents <= words(u, "Unit.Wants")
    # Declaring it would chown /run/oma (recursively) back and forth between oma and root: see the unit.
    assert "Service.RuntimeDirectory" not in u


@pytest.mark.parametrize("agent", AGENTS)
def test_agents_share_a_preserved_runtime_directory_omad_can_traverse(agent: str) -> None:
    u = unit(f"{agent}.service")
    assert last(u, "Service.RuntimeDirectory") == "oma"
    assert last(u, "Service.RuntimeDirectoryPreserve") == "yes"
    assert last(u, "Service.RuntimeDirectoryMode") == "0755"
    assert last(u, "Service.User") in (None, "root")
    # Group oma, so that the socket can be given to it without CAP_CHOWN.
    assert "oma" in words(u, "Service.SupplementaryGroups")
    assert "CAP_CHOWN" not in words(u, "Service.CapabilityBoundingSet")


# Settings that give a service a namespace of its own (mount, user, network, IPC, UTS) or a device cgroup.
NAMESPACE_KEYS = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateUsers",
                  "PrivateIPC", "PrivateMounts", "ProtectHostname", "ProtectKernelTunables", "ProtectKernelModules",
                  "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths",
                  "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
                  "RootDirectory", "RootImage", "NetworkNamespacePath", "IPCNamespacePath", "DynamicUser",
                  "ProtectClock", "DeviceAllow", "DevicePolicy")
OFF = ("", "no", "false", "0", "off", "default")


@pytest.mark.parametrize("agent", AGENTS)
def test_agents_use_only_namespace_free_hardening(agent: str) -> None:
    u = unit(f"{agent}.service")
    on = {k: last(u, f"Service.{k}") for k in NAMESPACE_KEYS if (last(u, f"Service.{k}") or "").lower() not in OFF}
    assert not on, f"{agent} mounts and attaches for the host; these would isolate it: {on}"


def test_nbd_pool_keeps_its_exports_across_restarts_and_loads_nbd_elsewhere() -> None:
    u = unit("nbd-pool.service")
    assert last(u, "Service.KillMode") == "process"
    assert "modprobe@nbd.service" in words(u, "Unit.Wants") & words(u, "Unit.After")
    assert "CAP_SYS_MODULE" not in words(u, "Service.CapabilityBoundingSet")
    assert words(u, "Service.IPAddressDeny") == {"any"} and words(u, "Service.IPAddressAllow") == {"localhost"}


@pytest.mark.parametrize("service", uc.SERVICES)
def test_a_daemon_that_uses_openat2_is_not_under_restrict_suid_sgid(service: str) -> None:
    """systemd implements RestrictSUIDSGID=yes by making openat2(2) fail with ENOSYS (seccomp cannot read the
    mode inside struct open_how): a daemon whose code (or oma_common.beneath) calls openat2 would fail every
    request under it on the appliance, while every test outside systemd passes."""
    name = service.removesuffix(".service")
    package = REPO / "daemons" / name / DAEMON_MODULES[name]
    users = sorted(str(p.relative_to(REPO)) for p in package.rglob("*.py")
                   if re.search(r"\bopenat2\b|oma_common\.beneath|from oma_common import .*\bbeneath\b", p.read_text()))
    if last(unit(service), "Service.RestrictSUIDSGID") == "yes":
        assert not users, f"{service} has RestrictSUIDSGID=yes, but openat2 is called by {users}"
    elif name != "omad":
        assert users, f"{service} gives up RestrictSUIDSGID= for openat2, which none of its modules calls any more"


def test_every_program_a_unit_runs_is_one_of_the_projects_console_scripts() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for service in uc.SERVICES:
        for prog in uc.exec_paths(uc.UNIT_DIR / service):
            assert prog.startswith("/usr/bin/") and Path(prog).name in scripts, (service, prog)


# -- the packaged configuration agrees with the units and tmpfiles.d ----------------------------------------


def tmpfiles_dirs() -> dict[str, tuple[str, str, str]]:
    """path -> (mode, user, group) of every `d` line."""
    out = {}
    for line in (uc.UNIT_DIR / "tmpfiles.d/oma.conf").read_text().splitlines():
        f = line.split()
        if f and f[0] == "d":
            out[f[1]] = (f[2], f[3], f[4])
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def effective_config(daemon: str, *dirs: Path) -> dict[str, Any]:
    args = [a for d in dirs for a in ("--config", str(d))]
    p = subprocess.run([sys.executable, "-m", DAEMON_MODULES[daemon], *args, "--show-config"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return flatten(json.loads(p.stdout))


@pytest.mark.parametrize("daemon", DAEMON_MODULES)
def test_packaged_dropins_are_understood_by_the_daemon(daemon: str) -> None:
    """Every key of the packaged defaults and of the /etc examples is one the daemon reads.

    The daemons ignore unknown keys, so a misspelt key would otherwise pass silently.
    """
    lib_dir = uc.UNIT_DIR / "oma" / f"{daemon}.d"
    etc_dir = REPO / "packaging/debian/etc/oma" / f"{daemon}.d"
    cfg = effective_config(daemon, lib_dir, etc_dir)
    for f in sorted(lib_dir.glob("*.toml")):
        for key, value in flatten(tomllib.loads(f.read_text())).items():
            assert key in cfg and cfg[key] == value, (f, key, value)
    for f in sorted(etc_dir.glob("*.toml")):
        assert tomllib.loads(f.read_text()) == {}, f"{f} ships settings; it is meant to hold examples only"
        # The commented-out examples name real keys with their defaults.
        for m in re.finditer(r"^# ?(\w+) = (.+?)[ \t]*(?:#.*)?$", f.read_text(), re.M):
            section = _section_before(f.read_text(), m.start())
            key = f"{section}.{m.group(1)}" if section else m.group(1)
            assert key in cfg, (f, key)
            assert cfg[key] == tomllib.loads(f"v = {m.group(2)}")["v"], (f, key)


def _section_before(text: str, pos: int) -> str:
    sections = re.findall(r"^# ?\[(\w+)\]", text[:pos], re.M)
    return sections[-1] if sections else ""


def test_state_paths_agree_with_units_and_tmpfiles() -> None:
    dirs = tmpfiles_dirs()
    omad = effective_config("omad", uc.UNIT_DIR / "oma/omad.d")
    assert dirs[omad["state_dir"]] == ("0750", "oma", "oma")
    # omad writes its state and the repositories: local ones inside its state dir, shares mounted by
    # volume-agent below its mount root, which is root's own directory (omad cannot plant a mount point).
    vagent = effective_config("volume-agent", uc.UNIT_DIR / "oma/volume-agent.d")
    assert words(unit("omad.service"), "Service.ReadWritePaths") == {omad["state_dir"],
                                                                     vagent["repository_mount_root"]}
    assert dirs[vagent["repository_mount_root"]] == ("0755", "root", "root")
    assert dirs[omad["state_dir"] + "/repositories"] == ("0750", "oma", "oma")
    pool = effective_config("nbd-pool", uc.UNIT_DIR / "oma/nbd-pool.d")
    assert {omad["state_dir"] + "/repositories", vagent["repository_mount_root"]} <= set(pool["export_roots"])
    # nbd-pool exports only the block devices volume-agent lists in its registry, in its root-only state dir.
    assert pool["vouched_registry"] == (vagent["vouched_registry"] or vagent["state_dir"] + "/vouched.json")
    assert omad["run_dir"] == "/run/oma"
    for agent in AGENTS:
        cfg = effective_config(agent, uc.UNIT_DIR / "oma" / f"{agent}.d")
        assert cfg["run_dir"] == "/run/" + last(unit(f"{agent}.service"), "Service.RuntimeDirectory")
        assert dirs[cfg["state_dir"]] == ("0700", "root", "root"), agent
        # Nothing of root's below the directory omad owns (it could rename it away and plant its own).
        assert not Path(cfg["state_dir"]).is_relative_to(omad["state_dir"]), agent
        if agent == "restore-mounter":
            assert dirs[cfg["mount_root"]] == ("0700", "root", "root")
            assert not Path(cfg["mount_root"]).is_relative_to(omad["state_dir"])


def test_changelog_version_is_pyprojects() -> None:
    if shutil.which("dpkg-parsechangelog") is None:
        pytest.skip("dpkg-parsechangelog is not installed (apt-get install dpkg-dev)")
    version = subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "packaging/debian/changelog"), "-S", "Version"],
                             capture_output=True, text=True, check=True).stdout.strip()
    upstream = version.rsplit("-", 1)[0]
    assert upstream == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# -- sysusers.d and tmpfiles.d applied to a scratch root ----------------------------------------------------


@pytest.mark.root
def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: systemd-tmpfiles chowns the directories it creates")
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install systemd)")
    root = tmp_path / "root"
    for kind in ("sysusers.d", "tmpfiles.d"):
        (root / "usr/lib" / kind).mkdir(parents=True)
        shutil.copy(uc.UNIT_DIR / kind / "oma.conf", root / "usr/lib" / kind / "oma.conf")
    (root / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={root}", "oma.conf"], check=True, capture_output=True)
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["oma"][5] == "/var/lib/oma" and passwd["oma"][6].endswith("nologin")
    uid, gid = int(passwd["oma"][2]), int(passwd["oma"][3])
    assert uid < 1000, "a system user"
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", "oma.conf"], check=True, capture_output=True)
    for path, (mode, user, group) in tmpfiles_dirs().items():
        st = (root / path.lstrip("/")).stat()
        assert oct(st.st_mode & 0o7777) == oct(int(mode, 8)), path
        assert (st.st_uid, st.st_gid) == ((uid, gid) if user == "oma" else (0, 0)), path


# -- each unit grants exactly what its daemon's adapters declare they need ---------------------------------

ADAPTERS = {"omad.service": "omad.adapters", "nbd-pool.service": "nbd_pool.adapters",
            "restore-mounter.service": "restore_mounter.adapters", "volume-agent.service": "volume_agent.adapters"}


def declared_needs(service: str) -> tuple[dict[str, Any], set[str]]:
    """The adapters package's NEEDS table and the names of the adapter modules it has."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(ADAPTERS[service])
    return pkg.NEEDS, {m.name for m in pkgutil.iter_modules(pkg.__path__)}


def syscall_groups(u: dict[str, list[str]]) -> tuple[set[str], set[str]]:
    """(allowed, denied) groups of the unit's SystemCallFilter= lines."""
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in u.get("Service.SystemCallFilter", []):
        if line.startswith("~"):
            denied |= set(line[1:].split())
        else:
            allowed |= set(line.split())
    return allowed, denied


@pytest.mark.parametrize("service", uc.SERVICES)
def test_every_adapter_declares_what_it_needs(service: str) -> None:
    table, modules = declared_needs(service)
    assert modules <= set(table), f"adapters of {service} without a NEEDS entry: {sorted(modules - set(table))}"
    for name, need in table.items():
        assert need.why, name


@pytest.mark.parametrize("service", uc.SERVICES)
def test_the_unit_grants_exactly_the_adapters_needs(service: str) -> None:
    from oma_common.privileges import union

    table, _ = declared_needs(service)
    need = union(table)
    u = unit(service)
    granted = words(u, "Service.CapabilityBoundingSet")
    assert granted == set(need.capabilities), (
        f"{service}: CapabilityBoundingSet= {sorted(granted)}, adapters need {sorted(need.capabilities)}")
    allowed, denied = syscall_groups(u)
    assert allowed - {"@system-service"} == set(need.syscalls), (service, allowed, need.syscalls)
    assert not (denied & set(need.syscalls)), f"{service} denies {sorted(denied & need.syscalls)} that adapters use"
    if last(u, "Service.PrivateDevices") == "yes":
        assert not need.devices, f"{service} has PrivateDevices=yes but adapters open {sorted(need.devices)}"
