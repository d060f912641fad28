"""The .deb as built by `make deb`: a clean tree afterwards, the right files, Debian-only dependencies."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import debbuild

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = debbuild.REPO
SERVICES = ("omad", "nbd-pool", "restore-mounter", "volume-agent")
DIST_PACKAGES = "/usr/lib/python3/dist-packages"

# Every third-party module the daemons import, and the Debian 12 package that provides it.
DEBIAN_MODULES = {
    "aiohttp": "python3-aiohttp",
    "aiosqlite": "python3-aiosqlite",
    "argon2": "python3-argon2",
    "cryptography": "python3-cryptography",
    "cs": "python3-cs",
    "psutil": "python3-psutil",
    "pydbus": "python3-pydbus",
    "pyroute2": "python3-pyroute2",
    "pyVmomi": "python3-pyvmomi",
    "sdnotify": "python3-sdnotify",
}
# The programs the agents run (ARCHITECTURE.md, HOST-NOTES.md) and the packages that carry them.
PROGRAM_PACKAGES = ("qemu-utils", "qemu-system-common", "libnbd-bin", "fuse3", "ntfs-3g", "fusefat", "e2fsprogs",
                    "xfsprogs", "fdisk", "util-linux", "kmod", "systemd", "procps")


def depends(deb: Path) -> set[str]:
    field = debbuild.deb_field(deb, "Depends")
    return {re.split(r"[\s(:]", alt.strip(), maxsplit=1)[0] for item in field.split(",") for alt in item.split("|")}


def test_make_deb_leaves_the_tree_clean(deb_build: debbuild.DebBuild) -> None:
    assert deb_build.leftovers == set(), f"make deb left files outside dist/: {sorted(deb_build.leftovers)}"
    assert not (deb_build.tree / "debian").exists()
    assert deb_build.deb.parent == deb_build.tree / "dist"
    assert deb_build.version == subprocess.run(
        ["dpkg-parsechangelog", "-l", str(REPO / "packaging/debian/changelog"), "-S", "Version"],
        capture_output=True, text=True, check=True).stdout.strip()


def test_package_ships_units_config_scripts_and_package_data(deb_build: debbuild.DebBuild) -> None:
    files = set(debbuild.deb_files(deb_build.deb))
    expected = {f"/lib/systemd/system/{s}.service" for s in SERVICES} | {"/lib/systemd/system/oma.target"}
    expected |= {"/usr/lib/sysusers.d/oma.conf", "/usr/lib/tmpfiles.d/oma.conf"}
    expected |= {f"/usr/lib/oma/{s}.d/10-appliance.toml" for s in SERVICES}
    expected |= {f"/usr/bin/{s}" for s in (*SERVICES, "omactl")}
    # Package data: the Swagger UI and the schema migrations, each file of them.
    omad_pkg = REPO / "daemons/omad/omad"
    data = [*(omad_pkg / "static").rglob("*"), *(omad_pkg / "store/migrations").glob("*.sql")]
    assert data, "no package data found in the tree"
    expected |= {f"{DIST_PACKAGES}/omad/{p.relative_to(omad_pkg)}" for p in data if p.is_file()}
    # Run by path, not imported: nbd-pool's socket-activation launcher (adapters/listen_fd.py).
    launcher = f"{DIST_PACKAGES}/nbd_pool/adapters/listen_fd_launcher.py"
    expected.add(launcher)
    missing = expected - files
    assert not missing, f"not in the package: {sorted(missing)}"
    # Installed units are the files in systemd/, byte for byte.
    extracted = deb_build.tree.parent / "extracted"
    subprocess.run(["dpkg-deb", "-x", str(deb_build.deb), str(extracted)], check=True)
    for s in SERVICES:
        assert (extracted / f"lib/systemd/system/{s}.service").read_bytes() == \
            (REPO / f"systemd/{s}.service").read_bytes()
    # The launcher runs isolated (-I -S) with Debian's python3 from where the package puts it.
    check = "import os, sys; sys.exit(os.environ['LISTEN_PID'] != str(os.getpid()) or not os.path.exists('/proc/self/fd/3'))"
    ran = subprocess.run(["/usr/bin/python3", "-I", "-S", str(extracted / launcher.lstrip("/")), "0", "--",
                          "/usr/bin/python3", "-I", "-c", check],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    assert ran.returncode == 0, ran.stderr


def test_conffiles_are_the_etc_oma_files(deb_build: debbuild.DebBuild) -> None:
    shipped = {"/" + str(p.relative_to(REPO / "packaging/debian")) for p in (REPO / "packaging/debian/etc").rglob("*")
               if p.is_file()}
    conffiles = set(debbuild.deb_control_file(deb_build.deb, "conffiles").split())
    assert conffiles == shipped


def test_every_imported_module_comes_from_a_debian_package_we_depend_on(deb_build: debbuild.DebBuild) -> None:
    ours = {p.name for d in (REPO / "daemons").iterdir() if d.is_dir() for p in d.iterdir()
            if (p / "__init__.py").exists()}
    imported: set[str] = set()
    for f in (REPO / "daemons").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - ours - {"__future__"}
    unknown = third_party - set(DEBIAN_MODULES)
    assert not unknown, f"imported but not mapped to a Debian package (add to Depends and here): {unknown}"
    deps = depends(deb_build.deb)
    missing = {DEBIAN_MODULES[m] for m in third_party} - deps
    assert not missing, f"imported modules whose Debian package is not in Depends: {missing}"
    assert set(PROGRAM_PACKAGES) <= deps, set(PROGRAM_PACKAGES) - deps
    assert not any("pip" in d for d in deps)


def test_maintainer_scripts_parse_and_do_things_in_order(deb_build: debbuild.DebBuild) -> None:
    scripts = {name: debbuild.deb_control_file(deb_build.deb, name) for name in ("postinst", "prerm", "postrm")}
    for name, text in scripts.items():
        p = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True)
        assert p.returncode == 0, f"{name}: {p.stderr}"
        assert "#DEBHELPER#" not in text, f"{name}: the debhelper snippets were not inserted"
    post = scripts["postinst"]
    order = [post.index("systemd-sysusers"), post.index("systemd-tmpfiles"),
             post.index("deb-systemd-invoke try-restart 'nbd-pool.service'"),
             post.index("deb-systemd-invoke start 'oma.target'")]
    assert order == sorted(order), "user, then directories, then services"
    # Static services are started through oma.target; deb-systemd-invoke would refuse them and say so.
    for s in SERVICES:
        assert f"deb-systemd-invoke $_dh_action '{s}.service'" not in post
    assert "deb-systemd-invoke stop 'oma.target'" in scripts["prerm"]
    assert "systemctl kill --kill-who=all nbd-pool.service" in scripts["prerm"]
    assert "rm -rf --one-file-system /var/lib/oma /var/lib/oma-agents /etc/oma" in scripts["postrm"]
