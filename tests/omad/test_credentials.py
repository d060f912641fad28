"""VMware credentials: CRUD, one default, passwords sealed and never returned, and a real login test."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.sim.vcenter import VCenterSim

from ..rig import Api, Stack
from .sealing import first_format

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
    # The simulator's certificate is self-signed: its credentials pin it.
    good = (await admin.post("/vmware-credentials", body(credential_name="sim", vcenter_host=vcsim.host,
                                                         username=vcsim.username, password=vcsim.password,
                                                         tls_thumbprint=vcsim.thumbprint)))[1]
    status, result = await admin.post(f"/vmware-credentials/{good['id']}/test")
    assert status == 200, result
    assert result["success"] is True and result["reason"] == "ok" and "vCenter" in result["server"]
    assert (result["pinned"], result["thumbprint"]) == (True, vcsim.thumbprint)

    wrong = (await admin.post("/vmware-credentials", body(credential_name="wrong", vcenter_host=vcsim.host,
                                                          username=vcsim.username, password="nope",
                                                          tls_thumbprint=vcsim.thumbprint)))[1]
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


async def test_login_test_is_bounded_and_checks_certificates_by_default(stack_config: Stack,
                                                                        vcsim: VCenterSim) -> None:
    stack_config.add_config("omad", "50-vcenter.toml", "[vcenter]\ntest_timeout_seconds = 1\n")
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


async def test_a_self_signed_vcenter_is_refused_with_its_thumbprint_until_pinned(stack: Stack, admin: Api,
                                                                                vcsim: VCenterSim) -> None:
    cred = (await admin.post("/vmware-credentials", body(credential_name="sim", vcenter_host=vcsim.host,
                                                         username=vcsim.username, password=vcsim.password)))[1]
    assert cred["tls_thumbprint"] == ""
    # First test: refused, and the answer names the certificate the server presented.
    status, result = await admin.post(f"/vmware-credentials/{cred['id']}/test")
    assert status == 200 and (result["success"], result["reason"], result["pinned"]) == (False, "tls", False)
    assert result["thumbprint"] == vcsim.thumbprint and vcsim.thumbprint in result["message"], result
    assert "not trusted" in result["message"]

    # The operator accepts it by saving it on the credential (any case, with or without colons).
    status, pinned = await admin.put(f"/vmware-credentials/{cred['id']}",
                                     {"tls_thumbprint": vcsim.thumbprint.replace(":", "").lower()})
    assert status == 200 and pinned["tls_thumbprint"] == vcsim.thumbprint, pinned
    assert (await admin.get(f"/vmware-credentials/{cred['id']}"))[1]["tls_thumbprint"] == vcsim.thumbprint
    status, result = await admin.post(f"/vmware-credentials/{cred['id']}/test")
    assert status == 200 and (result["success"], result["reason"], result["pinned"]) == (True, "ok", True), result

    # A SHA-1 pin (as older vSphere screens show it) works too.
    sha1 = hashlib.sha1(vcsim.certificate_der()).hexdigest().upper()
    assert (await admin.put(f"/vmware-credentials/{cred['id']}", {"tls_thumbprint": sha1}))[0] == 200
    assert (await admin.post(f"/vmware-credentials/{cred['id']}/test"))[1]["success"] is True

    # A wrong pin is refused, and says which certificate came instead.
    other = ":".join(["AB"] * 32)
    assert (await admin.put(f"/vmware-credentials/{cred['id']}", {"tls_thumbprint": other}))[0] == 200
    status, result = await admin.post(f"/vmware-credentials/{cred['id']}/test")
    assert status == 200 and (result["success"], result["reason"]) == (False, "tls"), result
    assert "not the pinned" in result["message"] and other in result["message"]
    assert result["thumbprint"] == vcsim.thumbprint

    # '' removes the pin: untrusted again. Malformed pins are refused at the edge.
    assert (await admin.put(f"/vmware-credentials/{cred['id']}", {"tls_thumbprint": ""}))[1]["tls_thumbprint"] == ""
    assert (await admin.post(f"/vmware-credentials/{cred['id']}/test"))[1]["reason"] == "tls"
    for bad in ("AB:CD", "ZZ" * 32, "AB" * 33, vcsim.thumbprint + ":", " " + vcsim.thumbprint):
        status, err = await admin.put(f"/vmware-credentials/{cred['id']}", {"tls_thumbprint": bad})
        assert status == 400 and err["code"] == "invalid_request", (bad, err)
        status, err = await admin.post("/vmware-credentials", body(credential_name="bad", tls_thumbprint=bad))
        assert status == 400, (bad, err)
    updates = [json.loads(d)["changed"] for (d,) in stack.sql(
        "SELECT details FROM audit_log WHERE action = 'vmware_credential.update' ORDER BY id")]
    assert updates == [["tls_thumbprint"]] * 4


def ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (ca.pem) and a certificate it signed for 127.0.0.1 (server.pem, server.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OMA test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcenter.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for p in paths:
        p.chmod(0o644)  # omad may run as another user; the key is a throwaway
    return paths


async def test_a_vcenter_whose_ca_is_trusted_needs_no_pin(stack_config: Stack, tmp_path: Path) -> None:
    ca_file, cert_file, key_file = ca_and_server_cert(stack_config.state)
    stack_config.add_config("omad", "50-vcenter.toml", f'[vcenter]\nca_file = "{ca_file}"\n')
    stack_config.start()
    with VCenterSim(username="oma", password="pw", default_vms=False, cert_file=cert_file, key_file=key_file) as sim:
        async with Api(stack_config.url) as admin:
            await admin.login("admin", stack_config.admin_password)
            cred = (await admin.post("/vmware-credentials", body(
                credential_name="ca", vcenter_host=sim.host, username="oma", password="pw")))[1]
            status, result = await admin.post(f"/vmware-credentials/{cred['id']}/test")
            assert status == 200 and (result["success"], result["pinned"]) == (True, False), result
            # The CA vouches for 127.0.0.1 only: the same server under another name is not trusted.
            status, result = await admin.put(f"/vmware-credentials/{cred['id']}",
                                             {"vcenter_host": f"localhost:{sim.port}"})
            assert status == 200
            status, result = await admin.post(f"/vmware-credentials/{cred['id']}/test")
            assert (result["success"], result["reason"]) == (False, "tls"), result
            assert "hostname" in result["message"].lower() or "match" in result["message"], result


async def test_a_sealed_password_copied_into_another_row_does_not_open(stack: Stack, admin: Api,
                                                                       vcsim: VCenterSim) -> None:
    mine = (await admin.post("/vmware-credentials", body(credential_name="mine", vcenter_host=vcsim.host,
                                                         username=vcsim.username, password=vcsim.password,
                                                         tls_thumbprint=vcsim.thumbprint)))[1]
    theirs = (await admin.post("/vmware-credentials", body(credential_name="theirs", vcenter_host=vcsim.host,
                                                           username=vcsim.username, password="other",
                                                           tls_thumbprint=vcsim.thumbprint)))[1]
    # Someone with write access to the database swaps the two sealed passwords.
    sealed = dict(stack.sql("SELECT id, password_sealed FROM vmware_credentials"))
    for a, b in ((mine["id"], theirs["id"]), (theirs["id"], mine["id"])):
        stack.sql("UPDATE vmware_credentials SET password_sealed = ? WHERE id = ?", (sealed[b], a))
    for cid in (mine["id"], theirs["id"]):
        status, err = await admin.post(f"/vmware-credentials/{cid}/test")
        assert status == 409 and err["code"] == "secret_unreadable", err
        assert "another row" in err["details"] and vcsim.password not in json.dumps(err)
    # Every use says so too (discovery logs in with the credential).
    status, err = await admin.post("/discovery/discover-vms", {"credential_id": theirs["id"], "create_context": False})
    assert status == 409 and err["code"] == "secret_unreadable", err
    # Setting the password again repairs the row.
    assert (await admin.put(f"/vmware-credentials/{mine['id']}", {"password": vcsim.password}))[0] == 200
    assert (await admin.post(f"/vmware-credentials/{mine['id']}/test"))[1]["success"] is True


async def test_a_password_sealed_before_row_binding_is_resealed_at_start_and_still_works(
        stack: Stack, admin: Api, vcsim: VCenterSim) -> None:
    cred = (await admin.post("/vmware-credentials", body(credential_name="old", vcenter_host=vcsim.host,
                                                         username=vcsim.username, password=vcsim.password,
                                                         tls_thumbprint=vcsim.thumbprint)))[1]
    stack.stop("omad")
    old = first_format(stack.state / "secret.key", vcsim.password, "vmware_credentials.password")
    stack.sql("UPDATE vmware_credentials SET password_sealed = ? WHERE id = ?", (old, cred["id"]))
    stack.start("omad")
    sealed = stack.sql("SELECT password_sealed FROM vmware_credentials WHERE id = ?", (cred["id"],))[0][0]
    assert sealed.startswith("v2.") and sealed != old
    async with Api(stack.url) as again:
        await again.login("admin", stack.admin_password)
        status, result = await again.post(f"/vmware-credentials/{cred['id']}/test")
        assert status == 200 and result["success"] is True, result
        # An old-format value put back while omad runs is not taken as it is.
        stack.sql("UPDATE vmware_credentials SET password_sealed = ? WHERE id = ?", (old, cred["id"]))
        status, err = await again.post(f"/vmware-credentials/{cred['id']}/test")
        assert status == 409 and err["code"] == "secret_unreadable", err
