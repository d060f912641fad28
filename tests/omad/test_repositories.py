"""Backup repositories: local directories checked for writability, NFS/CIFS shares mounted by volume-agent
(whose failure on this kernel is reported, not hidden), capacity by statvfs, CIFS passwords sealed at rest,
no deletion while backups exist, and the API's filters and dry-run test."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oma_common.contracts.volume_agent import Mounted, MountIn, ShareMounts, Unmounted
from oma_common.errors import Conflict, Invalid, TimedOut
from oma_common.rpc import AgentClient
from omad.adapters.localfs import LocalFs
from omad.audit import Audit
from omad.backup.repositories import PURPOSE, Repositories
from omad.crypto import SecretBox, SecretUnreadable
from omad.store.db import Database
from volume_agent.adapters import mount as m

from ..rig import Api, Stack
from .sealing import first_format

NO_NFS = m.kernel_lacks("nfs") or m.helper_missing("nfs") is not None


class FakeAgent:
    """volume-agent as far as omad's repositories see it: a 'mount' is a directory under its root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: dict[str, MountIn] = {}

    async def share_mounts(self) -> ShareMounts:
        return ShareMounts(str(self.root), [])

    async def mount_share(self, share: MountIn) -> Mounted:
        Path(share.mount_point).mkdir(parents=True, exist_ok=True)
        already = share.mount_point in self.mounted
        self.mounted[share.mount_point] = share
        return Mounted(share.mount_point, share.server, share.kind, True, already, "mounted")

    async def unmount_share(self, mount_point: str) -> Unmounted:
        self.mounted.pop(mount_point, None)
        return Unmounted(mount_point, True, "unmounted")


@pytest.fixture
async def repos(tmp_path: Path) -> AsyncIterator[tuple[Repositories, Database, FakeAgent]]:
    db = Database(tmp_path / "r.db")
    await db.open()
    await db.migrate()
    agent = FakeAgent(tmp_path / "mounts")
    box = SecretBox.from_key_file(tmp_path / "secret.key")
    try:
        yield Repositories(db, Audit(db), box, LocalFs(timeout=5), agent), db, agent  # type: ignore[arg-type]
    finally:
        await db.close()


async def test_cifs_password_is_sealed_and_given_only_to_the_agent(repos: tuple[Repositories, Database, FakeAgent],
                                                                   tmp_path: Path) -> None:
    r, db, agent = repos
    out = await r.create({"name": "smb", "type": "SMB", "config": {"server": "nas", "share_name": "bk",
                                                                    "username": "svc", "password": "s3cr3t!"}},
                         actor="admin")
    assert out["type"] == "cifs" and out["config"]["password_set"] is True and "password" not in out["config"]
    point = out["storage_info"]["mount_point"]
    assert point == str(tmp_path / "mounts" / out["id"]) and out["config"]["mount_point"] == point
    row = await db.fetchone("SELECT * FROM backup_repositories WHERE id = ?", (out["id"],))
    assert row is not None and "s3cr3t!" not in json.dumps(row)
    assert r.box.open(row["secret_sealed"], purpose=PURPOSE, row=out["id"]) == "s3cr3t!"
    agent.mounted.clear()
    _, root = await r.ready_root(out["id"])  # after a reboot: mounted again with the stored password
    assert str(root) == point and agent.mounted[point].password == "s3cr3t!"
    audit = await db.fetchall("SELECT details FROM audit_log WHERE action = 'repository.create'")
    assert audit and "s3cr3t!" not in audit[0]["details"]
    with pytest.raises(Invalid, match="password"):
        await r.create({"name": "nopw", "type": "cifs", "config": {"server": "nas", "share_name": "x",
                                                                   "username": "u"}}, actor="admin")


async def test_cifs_passwords_are_bound_to_their_repository(repos: tuple[Repositories, Database, FakeAgent],
                                                            tmp_path: Path) -> None:
    r, db, agent = repos
    ids = [(await r.create({"name": n, "type": "cifs", "config": {"server": "nas", "share_name": n, "username": "u",
                                                                   "password": f"pw-{n}"}}, actor="admin"))["id"]
           for n in ("a", "b")]
    sealed = {row["id"]: row["secret_sealed"] for row in await db.fetchall("SELECT id, secret_sealed FROM "
                                                                          "backup_repositories")}
    # A's password copied into B's row does not open there: B is not mounted with A's password.
    await db.execute("UPDATE backup_repositories SET secret_sealed = ? WHERE id = ?", (sealed[ids[0]], ids[1]))
    agent.mounted.clear()
    with pytest.raises(SecretUnreadable, match="unreadable"):
        await r.ready_root(ids[1])
    assert not agent.mounted
    # A password sealed before row binding is resealed once (omad does it at start-up) and still mounts.
    await db.execute("UPDATE backup_repositories SET secret_sealed = ? WHERE id = ?",
                     (first_format(tmp_path / "secret.key", "pw-b", PURPOSE), ids[1]))
    assert await r.reseal_unbound() == 1 and await r.reseal_unbound() == 0
    _, root = await r.ready_root(ids[1])
    assert agent.mounted[str(root)].password == "pw-b"
    row = await db.fetchone("SELECT secret_sealed FROM backup_repositories WHERE id = ?", (ids[1],))
    assert row is not None and row["secret_sealed"].startswith("v2.")


async def test_delete_is_refused_while_backups_exist(repos: tuple[Repositories, Database, FakeAgent],
                                                     tmp_path: Path) -> None:
    r, db, _ = repos
    (tmp_path / "local").mkdir()
    repo = await r.create({"name": "local", "type": "local", "config": {"disk_path": str(tmp_path / "local")}},
                          actor="admin")
    t = "2025-01-01T00:00:00.000Z"
    await db.execute("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
                     "created_at, updated_at) VALUES ('ctx-a', 'a', 'uuid-a', '/DC/vm/a', 'vc', ?, ?)", (t, t))
    await db.execute("INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, repository_id, backup_type, "
                     "chain_id, status, created_at, updated_at) VALUES ('backup-a-1', 'ctx-a', 'a', ?, 'full', "
                     "'backup-a-1', 'completed', ?, ?)", (repo["id"], t, t))
    with pytest.raises(Conflict) as info:
        await r.delete(repo["id"], actor="admin")
    assert info.value.extra["backup_count"] == 1 and "1 backup" in info.value.details
    await db.execute("DELETE FROM backup_jobs")
    assert (await r.delete(repo["id"], actor="admin"))["repository_id"] == repo["id"]


async def test_local_repositories_through_the_api(stack: Stack, admin: Api) -> None:
    # Below <state>/repositories: the out-of-the-box place under `make run`, with nothing configured.
    d1, d2 = stack.state / "repositories" / "one", stack.state / "repositories" / "two"
    d1.mkdir()
    d2.mkdir()
    status, one = await admin.post("/repositories", {"name": "one", "type": "Local", "config": {"disk_path": str(d1)},
                                                     "is_immutable": True, "min_retention_days": 7})
    assert status == 201, one
    assert one["type"] == "local" and one["enabled"] and one["is_immutable"] and one["min_retention_days"] == 7
    info = one["storage_info"]
    assert info["mount_point"] == str(d1) and info["total_bytes"] > 0 and info["available_bytes"] > 0
    assert info["used_bytes"] <= info["total_bytes"]
    st = os.statvfs(d1)
    assert info["total_bytes"] == st.f_blocks * st.f_frsize
    status, two = await admin.post("/repositories", {"name": "two", "type": "local", "enabled": False,
                                                     "config": {"disk_path": str(d2) + "/"}})
    assert status == 201 and two["config"]["disk_path"] == str(d2)

    # duplicate name, same or nested directory, missing or non-directory path, bad type: refused
    assert (await admin.post("/repositories", {"name": "one", "type": "local", "config": {"disk_path": str(d2)}}))[0] == 409
    status, body = await admin.post("/repositories", {"name": "nested", "type": "local",
                                                      "config": {"disk_path": str(d1)}})
    assert status == 409 and "overlaps" in body["details"]
    status, body = await admin.post("/repositories", {"name": "x", "type": "local",
                                                      "config": {"disk_path": str(d1.parent / "missing")}})
    assert status == 400 and "does not exist" in body["details"]
    (d1.parent / "afile").write_text("x")
    status, body = await admin.post("/repositories", {"name": "x", "type": "local",
                                                      "config": {"disk_path": str(d1.parent / "afile")}})
    assert status == 400 and "not a directory" in body["details"]
    status, body = await admin.post("/repositories", {"name": "x", "type": "tape", "config": {}})
    assert status == 400
    status, body = await admin.post("/repositories", {"name": "x", "type": "local", "config": {}})
    assert status == 400 and "disk_path: is required" in body["details"]

    status, listing = await admin.get("/repositories")
    assert status == 200 and [r["name"] for r in listing] == ["one", "two"]
    assert [r["name"] for r in (await admin.get("/repositories", params={"enabled": "false"}))[1]] == ["two"]
    assert [r["name"] for r in (await admin.get("/repositories", params={"type": "local",
                                                                         "enabled": "true"}))[1]] == ["one"]
    assert (await admin.get("/repositories", params={"type": "nfs"}))[1] == []

    status, storage = await admin.get(f"/repositories/{one['id']}/storage")
    assert status == 200 and storage["mount_point"] == str(d1) and storage["total_bytes"] == info["total_bytes"]
    assert storage["last_check_at"] >= info["last_check_at"]
    assert (await admin.get("/repositories/repo-nothing/storage"))[0] == 404

    status, test = await admin.post("/repositories/test", {"type": "local", "config": {"disk_path": str(d1)}})
    assert status == 200 and test["success"] is True and test["storage_info"]["total_bytes"] > 0
    status, test = await admin.post("/repositories/test", {"type": "local",
                                                           "config": {"disk_path": str(d1.parent / "nope")}})
    assert status == 200 and test["success"] is False and "does not exist" in test["error"]["details"]

    assert (await admin.delete(f"/repositories/{two['id']}"))[0] == 200
    assert (await admin.delete(f"/repositories/{two['id']}"))[0] == 404
    assert [r["name"] for r in (await admin.get("/repositories"))[1]] == ["one"]
    assert d2.exists()  # a local repository's directory is the administrator's: never removed
    audit = stack.sql("SELECT action, resource FROM audit_log WHERE action LIKE 'repository.%' ORDER BY id")
    assert audit == [("repository.create", f"repository:{one['id']}"), ("repository.create", f"repository:{two['id']}"),
                     ("repository.delete", f"repository:{two['id']}")]


@pytest.mark.skipif(not NO_NFS, reason="this machine has an NFS client; the failure message is only checked where "
                                       "the kernel or mount.nfs is missing")
async def test_network_shares_fail_clearly_without_a_client(stack: Stack, admin: Api) -> None:
    nfs = {"server": "127.0.0.1", "export_path": "/exports/backups", "options": "soft,timeo=10,retrans=1"}
    status, body = await admin.post("/repositories", {"name": "nfs", "type": "nfs", "config": nfs})
    assert status == 503, body
    assert body["error"] == "cannot mount the NFS share"
    assert "NFS client" in body["details"] or "nfs-common" in body["details"]
    assert (await admin.get("/repositories"))[1] == []  # nothing saved
    status, test = await admin.post("/repositories/test", {"type": "nfs", "config": nfs})
    assert status == 200 and test["success"] is False and test["error"]["code"] == "unavailable"
    status, body = await admin.post("/repositories", {"name": "smb", "type": "cifs", "config": {
        "server": "127.0.0.1", "share_name": "b", "username": "u", "password": "p"}})
    assert status == 503 and body["error"] == "cannot mount the CIFS share"
    assert not list((stack.state / "repositories").glob("*"))  # the agent left no mount point behind


async def test_a_repository_no_backup_could_use_is_refused_at_creation(stack_config: Stack) -> None:
    """Outside nbd-pool's export roots (asked from nbd-pool), or short of free space: a 400 that says why and
    what to change; inside the out-of-the-box root with the space: accepted."""
    stack = stack_config
    stack.add_config("omad", "60-space.toml", "[backup]\nrepository_min_free_bytes = 1048576\n")
    stack.start()
    pool = AgentClient("nbd-pool", stack.run_dir / "nbd-pool.sock", timeout=10)
    try:
        roots = await pool.call("GET", "/roots")
    finally:
        await pool.close()
    drop_in = str(stack.config_dirs["nbd-pool"] / "*.toml")
    assert roots["export_roots"][:2] == [str(stack.state / "repositories"), str(stack.state / "mounts")]
    assert roots["drop_in"] == drop_in and roots["key"] == "export_roots"
    outside = stack.state / "elsewhere"
    outside.mkdir()
    async with Api(stack.url) as api:
        await api.login("admin", stack.admin_password)
        status, body = await api.post("/repositories", {"name": "x", "type": "local",
                                                        "config": {"disk_path": str(outside)}})
        assert status == 400 and body["error"] == "outside the export roots", body
        assert str(stack.state / "repositories") in body["details"] and drop_in in body["details"], body
        assert "`export_roots`" in body["details"] and "restart nbd-pool" in body["details"]
        assert body["export_roots"] == roots["export_roots"] and body["drop_in"] == drop_in
        # The dry run refuses it the same way (a reachability failure is `success` false; this never works).
        status, test = await api.post("/repositories/test", {"type": "local", "config": {"disk_path": str(outside)}})
        assert status == 400 and test["error"] == "outside the export roots", test
        assert str(stack.state / "repositories") in test["details"] and drop_in in test["details"], test
        assert test["export_roots"] == roots["export_roots"] and test["drop_in"] == drop_in
        inside_missing = stack.state / "repositories" / "not-yet"
        status, test = await api.post("/repositories/test", {"type": "local",
                                                             "config": {"disk_path": str(inside_missing)}})
        assert status == 200 and test["success"] is False and "does not exist" in test["error"]["details"], test
        # A link from inside the roots to outside is judged by where it leads.
        (stack.state / "repositories" / "link").symlink_to(outside)
        status, body = await api.post("/repositories", {"name": "x", "type": "local",
                                                        "config": {"disk_path": str(stack.state / "repositories" / "link")}})
        assert status == 400 and body["error"] == "outside the export roots", body

        inside = stack.state / "repositories" / "main"
        inside.mkdir()
        stack.stop("omad")
        stack.add_config("omad", "61-space.toml", f"[backup]\nrepository_min_free_bytes = {1 << 62}\n")
        stack.start("omad")
    async with Api(stack.url) as api:
        await api.login("admin", stack.admin_password)
        status, body = await api.post("/repositories", {"name": "x", "type": "local",
                                                        "config": {"disk_path": str(inside)}})
        assert status == 400 and body["error"] == "not enough free space", body
        assert "repository_min_free_bytes" in body["details"]
        (stack.config_dirs["omad"] / "61-space.toml").unlink()
    stack.stop("omad")
    stack.start("omad")
    async with Api(stack.url) as api:
        await api.login("admin", stack.admin_password)
        status, body = await api.post("/repositories", {"name": "x", "type": "local",
                                                        "config": {"disk_path": str(inside)}})
        assert status == 201, body
    stack.stop()


async def test_a_share_mounted_though_its_answer_never_came_is_unmounted(
        repos: tuple[Repositories, Database, FakeAgent]) -> None:
    """volume-agent runs a request to its end when omad stops waiting (its time limit): the share may be
    mounted all the same, on the point omad chose; omad, which will record no repository for it, unmounts it."""
    r, db, agent = repos
    mounted = agent.mount_share

    async def answer_lost(share: MountIn) -> Mounted:
        await mounted(share)
        raise TimedOut("volume-agent timed out", "volume-agent did not answer within 90 s")

    agent.mount_share = answer_lost  # type: ignore[method-assign]
    with pytest.raises(TimedOut):
        await r.create({"name": "nfs", "type": "nfs", "config": {"server": "nas", "export_path": "/bk"}},
                       actor="admin")
    assert agent.mounted == {}, "a share is left mounted that no repository records"
    assert await db.scalar("SELECT COUNT(*) FROM backup_repositories") == 0


async def test_a_refused_repository_leaves_the_share_another_one_uses_mounted(
        repos: tuple[Repositories, Database, FakeAgent], tmp_path: Path) -> None:
    """A second repository on the same share and mount point is refused (the roots overlap); the share, which
    was already mounted for the first, stays mounted."""
    r, db, agent = repos
    config = {"server": "nas", "export_path": "/bk", "mount_point": str(tmp_path / "mounts" / "shared")}
    await r.create({"name": "first", "type": "nfs", "config": config}, actor="admin")
    with pytest.raises(Conflict, match="path in use"):
        await r.create({"name": "second", "type": "nfs", "config": config}, actor="admin")
    assert list(agent.mounted) == [config["mount_point"]], "the first repository's share was unmounted"
