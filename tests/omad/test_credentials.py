"""VMware credentials: CRUD, one default, passwords sealed and never returned, and a real login test."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.sim.vcenter import VCenterSim

from ..rig import Api, Stack

pytestmark = pytest.mark.timeout(300)  # the first use of the vCenter simulator may build it (~25 s)

SECRET = "Sup3r-séc/ret pa$$"


def body(**extra: object) -> dict[str, object]:
    return {"credential_name": "Production vCenter", "vcenter_host": "vc.example.com",
            "username": "administrator@vsphere.local", "password": SECRET, "datacenter": "DC1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_crud_round_trip(stack: Stack, admin: Api) -> None:
    status, created = await admin.post("/vmware-credentials", body())
    assert status == 201, created
    assert created["password_set"] is True and "password" not in created and "password_sealed" not in created
    assert (created["is_active"], created["is_default"], created["usage_count"], created["last_used"]) == \
        (True, False, 0, None)
    assert created["created_by"] == "admin"
    cid = created["id"]
    assert await admin.get(f"/vmware-credentials/{cid}") == (200, created)
    status, listed = await admin.get("/vmware-credentials")
    assert status == 200 and listed == {"credentials": [created], "count": 1}
    assert (await admin.get("/vmware-credentials/default"))[0] == 404

    status, updated = await admin.put(f"/vmware-credentials/{cid}", {"credential_name": "Prod", "password": ""})
    assert status == 200 and updated["credential_name"] == "Prod" and updated["vcenter_host"] == "vc.example.com"
    status, made_default = await admin.put(f"/vmware-credentials/{cid}/set-default")
    assert status == 200 and made_default["is_default"] is True
    assert (await admin.get("/vmware-credentials/default"))[1]["id"] == cid

    # A second default replaces the first; there is never more than one.
    status, second = await admin.post("/vmware-credentials", body(credential_name="DR", is_default=True))
    assert status == 201 and second["is_default"] is True
    assert (await admin.get(f"/vmware-credentials/{cid}"))[1]["is_default"] is False
    assert (await admin.post(f"/vmware-credentials/{cid}/set-default"))[1]["is_default"] is True  # POST alias
    assert stack.sql("SELECT id FROM vmware_credentials WHERE is_default = 1") == [(cid,)]
    # Deactivating the default leaves no default.
    status, inactive = await admin.put(f"/vmware-credentials/{cid}", {"is_active": False})
    assert status == 200 and (inactive["is_active"], inactive["is_default"]) == (False, False)
    assert (await admin.put(f"/vmware-credentials/{cid}/set-default"))[0] == 409

    assert (await admin.delete(f"/vmware-credentials/{second['id']}"))[0] == 200
    assert (await admin.get(f"/vmware-credentials/{second['id']}"))[0] == 404
    actions = [a for (a,) in stack.sql("SELECT action FROM audit_log WHERE action LIKE 'vmware_credential.%' "
                                       "ORDER BY id")]
    assert actions == ["vmware_credential.create", "vmware_credential.update", "vmware_credential.set_default",
                       "vmware_credential.create", "vmware_credential.set_default", "vmware_credential.update",
                       "vmware_credential.delete"]
    details = [json.loads(d) for (d,) in stack.sql("SELECT details FROM audit_log WHERE action = "
                                                   "'vmware_credential.update' ORDER BY id")]
    assert details == [{"changed": ["credential_name"]}, {"changed": ["is_active", "is_default"]}]


async def test_no_plaintext_password_at_rest_or_on_the_wire(stack: Stack, admin: Api) -> None:
    status, created = await admin.post("/vmware-credentials", body())
    assert status == 201
    status, _ = await admin.put(f"/vmware-credentials/{created['id']}", {"password": SECRET + "2"})
    assert status == 200
    for listing in (await admin.get("/vmware-credentials"), await admin.get(f"/vmware-credentials/{created['id']}")):
        assert SECRET not in json.dumps(listing)
    stack.stop("omad")  # checkpoints the WAL into the file, then both are searched
    for path in stack.state.glob("oma.db*"):
        raw = path.read_bytes()
        assert SECRET.encode() not in raw and SECRET.encode("utf-16-le") not in raw, path
    sealed = stack.sql("SELECT password_sealed FROM vmware_credentials")[0][0]
    assert sealed.startswith("v2.")


async def test_validation_and_conflicts(stack: Stack, admin: Api) -> None:
    for bad in ({"vcenter_host": "not a host"}, {"vcenter_host": "ftp://vc"}, {"vcenter_host": "vc:99999"},
                {"vcenter_host": "vc]"}, {"vcenter_host": "[fd00::5"},
                {"password": ""}, {"credential_name": ""}):
        status, err = await admin.post("/vmware-credentials", body(**bad))
        assert status == 400 and err["code"] == "invalid_request", (bad, err)
    assert (await admin.post("/vmware-credentials", body(vcenter_host="https://vc.example.com:8443/sdk")))[0] == 201
    status, err = await admin.post("/vmware-credentials", body())
    assert status == 409 and err["code"] == "conflict"
    assert (await admin.get("/vmware-credentials/abc"))[0] == 400
    assert (await admin.get("/vmware-credentials/999"))[0] == 404
    assert (await admin.post("/vmware-credentials", body(credential_name="x", is_active=False, is_default=True))
            )[0] == 400


async def test_operators_read_and_test_but_do_not_change(stack: Stack, admin: Api) -> None:
    cid = (await admin.post("/vmware-credentials", body()))[1]["id"]
    assert stack.omactl("user", "add", "olga", "--password-stdin", stdin="operator-pass\n").returncode == 0
    async with Api(stack.url) as op:
        await op.login("olga", "operator-pass")
        assert (await op.get("/vmware-credentials"))[0] == 200
        assert (await op.post("/vmware-credentials", body(credential_name="other")))[0] == 403
        assert (await op.put(f"/vmware-credentials/{cid}", {"username": "x"}))[0] == 403
        assert (await op.delete(f"/vmware-credentials/{cid}"))[0] == 403


async def test_a_credential_in_use_is_not_deleted(stack: Stack, admin: Api) -> None:
    cid = (await admin.post("/vmware-credentials", body()))[1]["id"]
    stack.sql("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
              "created_at, updated_at, credential_id) VALUES ('ctx-a', 'a', 'uuid-a', '/DC1/vm/a', 'vc', 't', 't', ?)",
              (cid,))
    status, err = await admin.delete(f"/vmware-credentials/{cid}")
    assert status == 409 and err["contexts"] == 1


async def test_login_test_against_a_real_vcenter(stack: Stack, admin: Api, vcsim: VCenterSim) -> None:
    good = (await admin.post("/vmware-credentials", body(credential_name="sim", vcenter_host=vcsim.host,
                                                         username=vcsim.username, password=vcsim.password)))[1]
    status, result = await admin.post(f"/vmware-credentials/{good['id']}/test")
    assert status == 200, result
    assert result["success"] is True and result["reason"] == "ok" and "vCenter" in result["server"]

    wrong = (await admin.post("/vmware-credentials", body(credential_name="wrong", vcenter_host=vcsim.host,
                                                          username=vcsim.username, password="nope")))[1]
    status, result = await admin.post(f"/vmware-credentials/{wrong['id']}/test")
    assert status == 200 and result["success"] is False
    assert result["reason"] == "invalid_credentials" and "user name or password" in result["message"]

    closed = (await admin.post("/vmware-credentials", body(credential_name="closed",
                                                           vcenter_host=f"127.0.0.1:{free_port()}")))[1]
    started = time.monotonic()
    status, result = await admin.post(f"/vmware-credentials/{closed['id']}/test")
    assert status == 200 and (result["success"], result["reason"]) == (False, "unreachable")
    assert "refused" in result["message"] and time.monotonic() - started < 5

    # omad's own port speaks HTTP, not TLS: the reason says so.
    plain = (await admin.post("/vmware-credentials", body(credential_name="plain",
                                                          vcenter_host=stack.url.split("//")[1])))[1]
    status, result = await admin.post(f"/vmware-credentials/{plain['id']}/test")
    assert status == 200 and (result["success"], result["reason"]) == (False, "tls"), result
    # Tests are not uses.
    assert (await admin.get(f"/vmware-credentials/{good['id']}"))[1]["usage_count"] == 0


async def test_login_test_is_bounded_and_checks_certificates_when_asked(stack_config: Stack,
                                                                       vcsim: VCenterSim) -> None:
    stack_config.add_config("omad", "50-vcenter.toml", "[vcenter]\ntest_timeout_seconds = 1\nverify_tls = true\n")
    stack_config.start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers
    try:
        async with Api(stack_config.url) as admin:
            await admin.login("admin", stack_config.admin_password)
            hung = (await admin.post("/vmware-credentials", body(
                credential_name="hung", vcenter_host=f"127.0.0.1:{silent.getsockname()[1]}")))[1]
            started = time.monotonic()
            status, result = await admin.post(f"/vmware-credentials/{hung['id']}/test")
            assert status == 200 and (result["success"], result["reason"]) == (False, "timeout"), result
            assert time.monotonic() - started < 4
            untrusted = (await admin.post("/vmware-credentials", body(
                credential_name="sim", vcenter_host=vcsim.host, username=vcsim.username,
                password=vcsim.password)))[1]
            status, result = await admin.post(f"/vmware-credentials/{untrusted['id']}/test")
            assert status == 200 and (result["success"], result["reason"]) == (False, "tls")
            assert "not trusted" in result["message"]
    finally:
        silent.close()
