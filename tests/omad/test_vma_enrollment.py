"""VMA enrollment against the real omad: pairing codes, proof of possession, approval, and what sshd is handed."""

from __future__ import annotations

import base64
import os
import pwd
import re
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from omad.vma import keys

from ..rig import Api, Stack
from .enrollment_rig import VmaKey, approved, enroll, pairing_code, verified

CODE = re.compile(r"^[ABCDEFGHJKMNPQRSTVWXYZ23456789]{4}-[ABCDEFGHJKMNPQRSTVWXYZ23456789]{4}-"
                  r"[ABCDEFGHJKMNPQRSTVWXYZ23456789]{4}$")


def authorized_keys(stack: Stack, user: str, fingerprint: str = "") -> list[str]:
    """What sshd's AuthorizedKeysCommand prints (omactl vma authorized-keys %u %f)."""
    out = stack.omactl("vma", "authorized-keys", user, *([fingerprint] if fingerprint else []))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def tunnel_user(stack: Stack) -> str:
    """The rig names the test's own user as the tunnel user (tests/rig.py)."""
    return pwd.getpwuid(os.getuid()).pw_name


async def test_enroll_verify_approve_hands_sshd_a_restricted_key(stack: Stack, admin: Api, anon: Api) -> None:
    status, code = await admin.post("/admin/vma/pairing-code", {"generated_by": "alice"})
    assert status == 200 and CODE.match(code["pairing_code"]) and code["valid_for"] == 600 and code["expires_at"]
    key = VmaKey.fresh("vma-east")
    status, out = await enroll(admin, anon, key, code["pairing_code"].lower().replace("-", ""))  # typed loosely
    assert status == 200, out
    assert out["status"] == "pending_verification" and re.fullmatch(r"[0-9a-f]{64}", out["challenge"]), out
    eid = out["enrollment_id"]

    status, pending = await admin.get("/admin/vma/pending")
    assert status == 200 and pending["count"] == 1 and pending["enrollments"][0]["status"] == "pending_verification"
    status, result = await anon.get("/vma/enroll/result", params={"enrollment_id": eid})
    assert status == 200 and result["status"] == "pending_verification" and "ssh_user" not in result

    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": eid, "signature": key.sign(out["challenge"])})
    assert status == 200 and body["status"] == "awaiting_approval", body
    user = tunnel_user(stack)
    assert authorized_keys(stack, user) == []  # verified is not approved

    status, body = await admin.post(f"/admin/vma/approve/{eid}", {"approved_by": "alice", "notes": "east DC"})
    assert status == 200 and body == {"success": True, "message": body["message"], "status": "approved",
                                      "ssh_user": user, "enrollment_id": eid}
    status, result = await anon.get("/vma/enroll/result", params={"enrollment_id": eid})
    assert status == 200 and result["status"] == "approved" and result["ssh_user"] == user
    assert "-N" in result["ssh_options"] and "host_key_hash" in result

    status, active = await admin.get("/admin/vma/active")
    assert status == 200 and active["count"] == 1
    conn = active["connections"][0]
    assert (conn["enrollment_id"], conn["vma_name"], conn["decided_by"]) == (eid, "vma-east", "alice")

    lines = authorized_keys(stack, user, conn["key_fingerprint"])
    assert len(lines) == 1
    options, keytype, blob, comment = lines[0].split(" ")
    assert (keytype, comment) == ("ssh-ed25519", f"oma-vma:{eid}") and key.public_line.split()[1] == blob
    opts = options.split(",")
    assert opts[:3] == ["restrict", "port-forwarding", 'command="/usr/sbin/nologin"']
    port = stack.url.rsplit(":", 1)[1]
    opens = [o for o in opts if o.startswith("permitopen=")]
    assert opens == [f'permitopen="127.0.0.1:{port}"'] + [f'permitopen="127.0.0.1:{p}"' for p in range(10100, 10201)]
    assert [o for o in opts if o.startswith("permitlisten=")] == ['permitlisten="127.0.0.1:9081"']
    assert authorized_keys(stack, "nobody", conn["key_fingerprint"]) == []  # only the tunnel user gets keys
    assert authorized_keys(stack, user, "SHA256:" + "A" * 43) == []


async def test_the_raw_challenge_text_may_be_signed_too(stack: Stack, admin: Api, anon: Api) -> None:
    key = VmaKey.fresh()
    status, out = await enroll(admin, anon, key)
    assert status == 200
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": out["enrollment_id"],
                                                          "signature": key.sign(out["challenge"], decoded=False)})
    assert status == 200 and body["status"] == "awaiting_approval"


async def test_a_forged_signature_rejects_the_enrollment(stack: Stack, admin: Api, anon: Api) -> None:
    key, thief = VmaKey.fresh("victim"), VmaKey.fresh("thief")
    status, out = await enroll(admin, anon, key)
    assert status == 200
    eid = out["enrollment_id"]
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": eid, "signature": thief.sign(out["challenge"])})
    assert status == 401 and body["code"] == "unauthorized" and "signature" in body["error"], body
    status, result = await anon.get("/vma/enroll/result", params={"enrollment_id": eid})
    assert result["status"] == "rejected"
    # The challenge was spent: the right signature now comes too late.
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": eid, "signature": key.sign(out["challenge"])})
    assert status == 409, body
    status, body = await admin.post(f"/admin/vma/approve/{eid}", {})
    assert status == 409, body
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": "enr-nope", "signature": "AAAA"})
    assert status == 404
    assert authorized_keys(stack, tunnel_user(stack)) == []


async def test_a_challenge_answers_once_and_only_its_own_enrollment(stack: Stack, admin: Api, anon: Api) -> None:
    key = VmaKey.fresh()
    status, first = await enroll(admin, anon, key)
    signature = key.sign(first["challenge"])
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": first["enrollment_id"], "signature": signature})
    assert status == 200
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": first["enrollment_id"], "signature": signature})
    assert status == 409 and body["code"] == "conflict", body  # replayed
    # A valid signature of one challenge does not answer another enrollment's challenge.
    status, second = await enroll(admin, anon, key)
    assert second["challenge"] != first["challenge"]
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": second["enrollment_id"],
                                                          "signature": signature})
    assert status == 401, body


async def test_pairing_codes_are_single_use_and_expire(stack: Stack, admin: Api, anon: Api) -> None:
    code = await pairing_code(admin)
    status, _ = await enroll(admin, anon, VmaKey.fresh("one"), code)
    assert status == 200
    status, body = await enroll(admin, anon, VmaKey.fresh("two"), code)
    assert status == 401 and body["error"] == "invalid pairing code", body
    status, body = await enroll(admin, anon, VmaKey.fresh("three"), "ABCD-EFGH-JKMN")
    assert status == 401
    late = await pairing_code(admin)
    stack.sql("UPDATE vma_pairing_codes SET expires_at = '2000-01-01T00:00:00.000Z' WHERE used_at IS NULL")
    status, body = await enroll(admin, anon, VmaKey.fresh("four"), late)
    assert status == 401, body
    status, body = await admin.post("/admin/vma/pairing-code", {"valid_for": 10})
    assert status == 400


async def test_only_ed25519_keys_are_taken_and_a_refused_key_keeps_the_code(stack: Stack, admin: Api,
                                                                            anon: Api) -> None:
    code = await pairing_code(admin)
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    body = {"pairing_code": code, "vma_public_key": rsa_pub, "vma_name": "v"}
    status, out = await anon.post("/vma/enroll", body)
    assert status == 400 and out["error"] == "unsupported key type", out
    # An ed25519 label on a blob of another type is caught too.
    fake = "ssh-ed25519 " + rsa_pub.split()[1]
    status, out = await anon.post("/vma/enroll", {**body, "vma_public_key": fake})
    assert status == 400 and out["error"] == "malformed public key", out
    status, out = await anon.post("/vma/enroll", {**body, "vma_public_key": "ssh-ed25519 not*base64"})
    assert status == 400
    status, out = await enroll(admin, anon, VmaKey.fresh(), code)
    assert status == 200, out


async def test_expired_challenge_and_rejection(stack: Stack, admin: Api, anon: Api) -> None:
    key = VmaKey.fresh()
    status, out = await enroll(admin, anon, key)
    stack.sql("UPDATE vma_enrollments SET challenge_expires_at = '2000-01-01T00:00:00.000Z' WHERE id = ?",
              (out["enrollment_id"],))
    status, body = await anon.post("/vma/enroll/verify", {"enrollment_id": out["enrollment_id"],
                                                          "signature": key.sign(out["challenge"])})
    assert status == 409 and body["error"] == "challenge expired", body
    status, result = await anon.get("/vma/enroll/result", params={"enrollment_id": out["enrollment_id"]})
    assert result["status"] == "expired"

    eid = await verified(admin, anon, VmaKey.fresh("refused"))
    status, body = await admin.post(f"/admin/vma/reject/{eid}", {"rejected_by": "bob", "reason": "unknown site"})
    assert status == 200 and body["status"] == "rejected"
    status, result = await anon.get("/vma/enroll/result", params={"enrollment_id": eid})
    assert result["status"] == "rejected" and "unknown site" in result["message"]
    status, body = await admin.post(f"/admin/vma/approve/{eid}", {})
    assert status == 409
    assert authorized_keys(stack, tunnel_user(stack)) == []


async def test_one_key_is_approved_once_and_revoke_removes_it(stack: Stack, admin: Api, anon: Api) -> None:
    key = VmaKey.fresh()
    eid = await approved(admin, anon, key)
    again = await verified(admin, anon, key)
    status, body = await admin.post(f"/admin/vma/approve/{again}", {})
    assert status == 409 and body["error"] == "key already approved", body
    user = tunnel_user(stack)
    assert len(authorized_keys(stack, user)) == 1
    status, body = await admin.delete(f"/admin/vma/revoke/{eid}", params={"revoked_by": "carol"})
    assert status == 200 and body["status"] == "revoked" and body["sessions_terminated"] == 0, body
    assert authorized_keys(stack, user) == []
    status, body = await admin.delete(f"/admin/vma/revoke/{eid}")
    assert status == 409
    status, active = await admin.get("/admin/vma/active")
    assert active["count"] == 0 and active["tunnel_up"] is False


async def test_revoking_a_key_with_more_logins_than_one_request_holds_ends_them_all(stack: Stack, admin: Api,
                                                                                   anon: Api) -> None:
    """volume-agent takes at most MAX_SESSIONS sessions per terminate request: a key with more recorded logins
    is ended in batches, and every login is checked and forgotten (none is sshd's monitor here, so each is
    skipped and none is killed)."""
    from oma_common.contracts.volume_agent import MAX_SESSIONS

    eid = await approved(admin, anon, VmaKey.fresh())
    fingerprint = stack.sql("SELECT key_fingerprint FROM vma_enrollments WHERE id = ?", (eid,))[0][0]
    count = 2 * MAX_SESSIONS + 1
    for i in range(count):  # pids above any pid_max: no process can be one of them
        stack.sql("INSERT INTO vma_tunnel_logins (monitor_pid, monitor_start, enrollment_id, key_fingerprint, at)"
                  " VALUES (?, 0, ?, ?, '2026-12-07T00:00:00.000Z')", (5_000_000 + i, eid, fingerprint))
    status, body = await admin.delete(f"/admin/vma/revoke/{eid}")
    assert status == 200 and body["sessions_terminated"] == 0 and "failed" not in body["message"], body
    assert stack.sql("SELECT COUNT(*) FROM vma_tunnel_logins WHERE enrollment_id = ?", (eid,)) == [(0,)]


async def test_admin_calls_need_an_administrator(stack: Stack, admin: Api, anon: Api) -> None:
    assert stack.omactl("user", "add", "op", "--role", "operator", "--password-stdin", stdin="password-123\n"
                        ).returncode == 0
    operator = Api(stack.url)
    try:
        await operator.login("op", "password-123")
        for method, path in (("POST", "/admin/vma/pairing-code"), ("GET", "/admin/vma/pending"),
                             ("GET", "/admin/vma/active"), ("GET", "/admin/vma/audit"),
                             ("POST", "/admin/vma/approve/x"), ("DELETE", "/admin/vma/revoke/x")):
            status, _ = await operator.request(method, path, json_body={} if method == "POST" else None)
            assert status == 403, (method, path)
            status, _ = await anon.request(method, path, json_body={} if method == "POST" else None)
            assert status == 401, (method, path)
    finally:
        await operator.close()


async def test_the_audit_log_holds_every_step_with_who_did_it(stack: Stack, admin: Api, anon: Api) -> None:
    eid = await approved(admin, anon, VmaKey.fresh("vma-audit"))
    await enroll(admin, anon, VmaKey.fresh("intruder"), "ZZZZ-ZZZZ-ZZZZ")
    status, body = await admin.delete(f"/admin/vma/revoke/{eid}", params={"revoked_by": "dave"})
    assert status == 200
    status, log = await admin.get("/admin/vma/audit")
    assert status == 200 and log["filter"] == {"event_type": None, "limit": 100}
    steps = [(e["event_type"], e["actor"], e["outcome"]) for e in reversed(log["events"])]
    assert steps == [("pairing_code.create", "admin", "ok"), ("enroll", "vma:vma-audit", "ok"),
                     ("verify", "vma:vma-audit", "ok"), ("approve", "admin", "ok"),
                     ("enroll", "vma:intruder", "denied"),
                     ("revoke", "admin", "ok"), ("tunnel.terminate", "admin", "ok")], steps
    by_type = {e["event_type"]: e for e in log["events"]}
    assert by_type["enroll"]["source"] == "127.0.0.1"
    assert by_type["approve"]["details"]["approved_by"] == "test-admin"
    assert by_type["revoke"]["details"]["revoked_by"] == "dave"
    status, only = await admin.get("/admin/vma/audit", params={"event_type": "approve", "limit": "5"})
    assert only["count"] == 1 and only["events"][0]["resource"] == f"enrollment:{eid}"


async def test_omactl_vma_lists_approves_and_revokes(stack: Stack, admin: Api, anon: Api) -> None:
    eid = await verified(admin, anon, VmaKey.fresh("cli"))
    listed = stack.omactl("vma", "list")
    assert listed.returncode == 0 and eid in listed.stdout and "awaiting_approval" in listed.stdout
    out = stack.omactl("vma", "approve", eid, "--notes", "by hand")
    assert out.returncode == 0 and "approved" in out.stdout, out.stderr
    assert len(authorized_keys(stack, tunnel_user(stack))) == 1
    out = stack.omactl("vma", "revoke", eid)
    assert out.returncode == 0 and "revoked" in out.stdout, out.stderr
    assert authorized_keys(stack, tunnel_user(stack)) == []
    out = stack.omactl("vma", "revoke", eid)
    assert out.returncode == 1 and "revoked" in out.stderr
    status, log = await admin.get("/admin/vma/audit", params={"event_type": "revoke"})
    assert log["events"][0]["actor"].startswith("omactl:")
    code = stack.omactl("vma", "pairing-code", "--valid-for", "120")
    assert code.returncode == 0 and CODE.match(code.stdout.split()[0])


async def test_public_calls_are_rate_limited_per_address(stack_config: Stack) -> None:
    stack_config.add_config("omad", "50-limits.toml", "[enrollment]\nrate_limit = 4\nrate_window_seconds = 600\n")
    stack_config.start()
    async with Api(stack_config.url) as anon:
        for _ in range(4):
            status, _body = await anon.get("/vma/enroll/result", params={"enrollment_id": "enr-x"})
            assert status == 404
        status, body = await anon.post("/vma/enroll", {"pairing_code": "ABCD-EFGH-JKMN", "vma_name": "v",
                                                       "vma_public_key": VmaKey.fresh().public_line})
        assert status == 429 and body["code"] == "rate_limited", body


def test_fingerprints_agree_with_ssh_keygen(tmp_path: Path) -> None:
    """The fingerprint sshd passes as %f is the one omad stores."""
    key = VmaKey.fresh("fp")
    path = tmp_path / "k.pub"
    path.write_text(key.public_line + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[1] == keys.parse(key.public_line).fingerprint
    assert keys.host_key_fingerprint(key.public_line) == out.stdout.split()[1]
    assert base64.b64decode(key.public_line.split()[1])
