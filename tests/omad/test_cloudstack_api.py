"""The CloudStack settings, OSSEA config and resource endpoints of omad against the CloudStack simulator.

detect-oma-vm reads this machine's real interfaces: the simulator's appliance VM is given the MAC address of
one of them (read here with pyroute2), so omad, in the same network namespace, must find that VM.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from tests.sim.cloudstack import CloudStackSim, running

from oma_common.errors import Conflict
from omad.audit import Audit
from omad.cloudstack.config import PURPOSE, Configs
from omad.crypto import SecretBox, SecretUnreadable
from omad.store.db import Database

from ..rig import Api, Stack
from .sealing import first_format

pytestmark = pytest.mark.timeout(120)


@functools.cache
def this_machines_mac() -> str:
    """Read once, outside any event loop (pyroute2's synchronous API runs a loop of its own)."""
    with IPRoute() as ipr:
        for link in ipr.get_links():
            mac = (link.get_attr("IFLA_ADDRESS") or "").lower()
            if len(mac) == 17 and mac != "00:00:00:00:00:00":
                return mac
    pytest.skip("this machine has no interface with a MAC address")


@pytest.fixture
def cs(short_tmp: Path) -> Iterator[CloudStackSim]:
    with running(short_tmp / "cs", short_tmp / "by-id", appliance_mac=this_machines_mac(),
                 secret_key="sim-Secret/with+odd=chars") as sim:
        yield sim


@pytest.fixture
def stack(stack_config: Stack, cs: CloudStackSim) -> Iterator[Stack]:
    """omad alone (no agent is needed here), calling the simulator with short time limits; the shared `admin`
    fixture logs in to it."""
    stack_config.add_config("omad", "50-cloudstack.toml", "[cloudstack]\ntimeout_seconds = 5\n"
                                                          "poll_interval_seconds = 0.05\n")
    stack_config.start("omad")
    yield stack_config


def creds(cs: CloudStackSim, **extra: Any) -> dict[str, Any]:
    return {"api_url": cs.endpoint, "api_key": cs.api_key, "secret_key": cs.secret_key, **extra}


def ids(cs: CloudStackSim) -> dict[str, str]:
    inv = cs.inv
    return {"zone": next(iter(inv.zones)), "oma_vm_id": cs.appliance_vm_id,
            "template_id": next(iter(inv.templates)),
            "network_id": next(n.id for n in inv.networks.values() if n.name == "prod-net"),
            "service_offering_id": next(iter(inv.service_offerings)),
            "disk_offering_id": next(d.id for d in inv.disk_offerings.values() if d.iscustomized)}


def config(cs: CloudStackSim, **extra: Any) -> dict[str, Any]:
    return {"name": "primary", **creds(cs), **ids(cs), **extra}


async def test_config_envelope_round_trip_and_the_secret_never_leaves(stack: Stack, admin: Api,
                                                                      cs: CloudStackSim) -> None:
    answers: list[Any] = []
    status, empty = await admin.post("/ossea/config", {"action": "get"})
    assert status == 200 and empty["configs"] == [] and empty["config"] is None and empty["success"] is True
    status, err = await admin.post("/ossea/config", {"action": "create", "config": {"name": "x",
                                                                                   "api_url": cs.endpoint}})
    assert status == 400 and set(err["missing"]) == {"api_key", "secret_key", "zone", "oma_vm_id"}

    status, created = await admin.post("/ossea/config", {"action": "create", "config": config(cs)})
    answers.append(created)
    assert status == 200, created
    c = created["config"]
    assert created["action"] == "create" and created["success"] is True and created["timestamp"]
    assert c["secret_key_set"] is True and "secret_key" not in c and "secret_key_sealed" not in c
    assert c["is_default"] is True and c["api_url"] == cs.endpoint and c["oma_vm_id"] == cs.appliance_vm_id
    status, got = await admin.post("/ossea/config", {"action": "get"})
    answers.append(got)
    assert got["config"] == c and got["configs"] == [c]
    assert (await admin.post("/ossea/config", {"action": "get", "id": c["id"]}))[1]["config"] == c

    # An update without a secret keeps the stored one: the test still signs correctly.
    status, updated = await admin.post("/ossea/config", {"action": "update", "id": c["id"],
                                                         "config": {"name": "renamed", "secret_key": ""}})
    answers.append(updated)
    assert status == 200 and updated["config"]["name"] == "renamed"
    status, tested = await admin.post("/ossea/config", {"action": "test", "id": c["id"]})
    answers.append(tested)
    assert status == 200 and tested["success"] is True and tested["test_result"]["zones"] == 1, tested
    # Unsaved credentials are tested as given; CloudStack's refusal comes back in its words.
    status, wrong = await admin.post("/ossea/config", {"action": "test",
                                                       "config": creds(cs, secret_key="wrong-secret")})
    assert status == 200 and wrong["success"] is False
    assert "unable to verify user credentials" in wrong["test_result"]["error"]

    second = (await admin.post("/ossea/config", {"action": "create",
                                                 "config": config(cs, name="dr", is_default=True)}))[1]["config"]
    assert second["is_default"] is True
    assert (await admin.post("/ossea/config", {"action": "get", "id": c["id"]}))[1]["config"]["is_default"] is False
    assert (await admin.post("/ossea/config", {"action": "update", "config": {"name": "y"}}))[0] == 400
    assert (await admin.post("/ossea/config", {"action": "create", "config": config(cs, name="dr")}))[0] == 409

    # A config a VM context replicates with is not deleted.
    stack.sql("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
             "created_at, updated_at, ossea_config_id) VALUES ('ctx-a', 'a', 'uuid-a', '/a', 'vc', 't', 't', ?)",
             (second["id"],))
    status, err = await admin.post("/ossea/config", {"action": "delete", "id": second["id"]})
    assert status == 409 and err["contexts"] == 1
    status, deleted = await admin.post("/ossea/config", {"action": "delete", "id": c["id"]})
    assert status == 200 and deleted["success"] is True
    assert (await admin.post("/ossea/config", {"action": "get", "id": c["id"]}))[0] == 404
    assert (await admin.post("/ossea/config", {"action": "frobnicate"}))[0] == 400

    for answer in answers:
        assert cs.secret_key not in json.dumps(answer)
    audit = stack.sql("SELECT action, details FROM audit_log WHERE action LIKE 'ossea_config.%' ORDER BY id")
    assert [a for a, _ in audit] == ["ossea_config.create", "ossea_config.update", "ossea_config.create",
                                     "ossea_config.delete"]
    assert json.loads(audit[1][1]) == {"changed": ["name"]}  # an empty secret is no change
    assert all(cs.secret_key not in d for _, d in audit)
    sealed = stack.sql("SELECT secret_key_sealed FROM ossea_configs")
    assert sealed and all(s.startswith("v2.") for (s,) in sealed)
    stack.stop("omad")  # checkpoints the WAL into the file, then every file of the database is searched
    for path in stack.state.glob("oma.db*"):
        raw = path.read_bytes()
        assert cs.secret_key.encode() not in raw and cs.secret_key.encode("utf-16-le") not in raw, path


async def test_operators_may_not_change_or_use_credentials(stack: Stack, admin: Api, cs: CloudStackSim) -> None:
    assert stack.omactl("user", "add", "olga", "--password-stdin", stdin="operator-pass\n").returncode == 0
    async with Api(stack.url) as op:
        await op.login("olga", "operator-pass")
        assert (await op.post("/ossea/config", {"action": "create", "config": config(cs)}))[0] == 403
        assert (await op.post("/settings/cloudstack/test-connection", creds(cs)))[0] == 403


async def test_connection_tests(admin: Api, cs: CloudStackSim) -> None:
    status, ok = await admin.post("/settings/cloudstack/test-connection", creds(cs))
    assert status == 200 and ok["success"] is True and ok["zones"] == 1, ok
    status, bad = await admin.post("/settings/cloudstack/test-connection", creds(cs, secret_key="nope"))
    assert status == 200 and bad["success"] is False and "unable to verify" in bad["error"]
    assert bad["code"] == "cloudstack_unauthorized"
    status, down = await admin.post("/settings/cloudstack/test-connection",
                                    creds(cs, api_url="http://127.0.0.1:1/client/api"))
    assert status == 200 and down["success"] is False and down["code"] == "unavailable"
    # base_url in host:port form, as the setup wizard sends it
    hostport = cs.endpoint.removeprefix("http://").removesuffix("/client/api")
    status, short = await admin.post("/settings/cloudstack/test-connection",
                                     {"base_url": hostport, "api_key": cs.api_key, "secret_key": cs.secret_key})
    assert status == 200 and short["success"] is True
    # Nothing saved, nothing given: 400 naming what is missing.
    status, err = await admin.post("/settings/cloudstack/test-connection", {})
    assert status == 400 and "secret_key" in err["details"]

    await admin.post("/ossea/config", {"action": "create", "config": config(cs)})
    status, saved = await admin.post("/settings/cloudstack/test-connection", {})
    assert status == 200 and saved["success"] is True
    # The stored secret is never used to sign for another URL.
    status, err = await admin.post("/settings/cloudstack/test-connection", {"api_url": "http://evil.example:80"})
    assert status == 400 and err["error"] == "secret key required"


async def test_detect_oma_vm_finds_the_vm_with_this_machines_mac(admin: Api, cs: CloudStackSim) -> None:
    mac = this_machines_mac()
    status, found = await admin.post("/settings/cloudstack/detect-oma-vm", creds(cs))
    assert status == 200 and found["success"] is True, found
    info = found["oma_info"]
    assert info["vm_id"] == cs.appliance_vm_id and info["vm_name"] == "oma-appliance"
    assert info["mac_address"] == mac and info["interface"] and info["network_name"] == "prod-net"
    assert mac in found["local_mac_addresses"]

    cs.inv.vms[cs.appliance_vm_id].nics[0].macaddress = "02:00:00:00:00:99"
    status, none = await admin.post("/settings/cloudstack/detect-oma-vm", creds(cs))
    assert status == 200 and none["success"] is False and none["oma_info"] is None
    assert mac in none["message"]


async def test_discovery_answers_everything_in_one_call(admin: Api, cs: CloudStackSim) -> None:
    status, everything = await admin.post("/settings/cloudstack/discover-all", creds(cs))
    assert status == 200 and everything["success"] is True, everything
    assert everything["oma_vm_id"] == cs.appliance_vm_id and everything["oma_vm_name"] == "oma-appliance"
    assert [z["name"] for z in everything["zones"]] == ["zone-sim-1"]
    assert {n["name"] for n in everything["networks"]} == {"prod-net", "test-net"}
    assert [t["name"] for t in everything["templates"]] == ["Debian 12"]
    assert len(everything["service_offerings"]) == 3 and len(everything["disk_offerings"]) == 2
    assert {d["name"] for d in everything["domains"]} == {"ROOT", "customers"}
    offering = next(o for o in everything["service_offerings"] if o["name"] == "Medium Instance")
    assert (offering["cpu_number"], offering["memory"]) == (2, 4096)

    status, resources = await admin.post("/ossea/discover-resources", creds(cs))
    assert status == 200 and resources["success"] is True and "oma_vm_id" not in resources
    assert resources["networks"] == everything["networks"]
    status, err = await admin.post("/ossea/discover-resources", creds(cs, secret_key="x"))
    assert status == 503 and err["code"] == "cloudstack_unauthorized" and "unable to verify" in err["details"]


async def test_validate_names_each_missing_id(admin: Api, cs: CloudStackSim) -> None:
    status, ok = await admin.post("/settings/cloudstack/validate", {**creds(cs), **ids(cs)})
    assert status == 200 and ok["success"] is True and ok["result"]["overall_status"] == "pass", ok
    assert {c["field"]: c["status"] for c in ok["result"]["checks"]} == dict.fromkeys(ids(cs), "pass")

    bad = {**ids(cs), "template_id": "0f0e0d0c-no-such-template", "network_id": "no-such-net", "oma_vm_id": "gone-vm"}
    status, missing = await admin.post("/settings/cloudstack/validate", {**creds(cs), **bad})
    assert status == 200 and missing["success"] is False and missing["result"]["overall_status"] == "fail"
    assert {(m["field"], m["id"]) for m in missing["result"]["missing"]} == {
        ("template_id", "0f0e0d0c-no-such-template"), ("network_id", "no-such-net"), ("oma_vm_id", "gone-vm")}
    for text in ("template '0f0e0d0c-no-such-template'", "network 'no-such-net'", "appliance VM 'gone-vm'"):
        assert text in missing["message"]
    # Ids not given are taken from the saved config.
    await admin.post("/ossea/config", {"action": "create", "config": config(cs, service_offering_id="no-so")})
    status, from_saved = await admin.post("/settings/cloudstack/validate", {})
    assert status == 200 and [m["field"] for m in from_saved["result"]["missing"]] == ["service_offering_id"]
    assert "service offering 'no-so'" in from_saved["message"]


async def test_streamlined_save_checks_then_saves_the_default(stack: Stack, admin: Api, cs: CloudStackSim) -> None:
    the_ids = ids(cs)
    body = {**creds(cs), **{k: v for k, v in the_ids.items() if k != "zone"}, "zone_id": the_ids["zone"],
            "domain_name": "ROOT"}
    status, err = await admin.post("/ossea/config-streamlined", {**body, "disk_offering_id": "no-such-offering"})
    assert status == 400 and "disk offering 'no-such-offering'" in err["details"]
    assert stack.sql("SELECT COUNT(*) FROM ossea_configs") == [(0,)]
    status, saved = await admin.post("/ossea/config-streamlined", body)
    assert status == 200 and saved["success"] is True, saved
    assert saved["config"]["name"] == "production-ossea" and saved["config"]["is_default"] is True
    assert saved["config"]["zone"] == the_ids["zone"] and saved["config"]["domain"] == "ROOT"
    assert cs.secret_key not in json.dumps(saved)
    status, again = await admin.post("/ossea/config-streamlined", {**body, "network_id": the_ids["network_id"]})
    assert status == 200 and again["config"]["id"] == saved["config"]["id"]
    assert stack.sql("SELECT COUNT(*) FROM ossea_configs") == [(1,)]


async def test_networks_and_offerings_of_the_saved_config(admin: Api, cs: CloudStackSim) -> None:
    for path in ("/networks/available", "/service-offerings/available", "/settings/cloudstack/networks"):
        status, err = await admin.get(path)
        assert status == 409 and err["error"] == "no CloudStack config", (path, err)
    await admin.post("/ossea/config", {"action": "create", "config": config(cs)})
    status, nets = await admin.get("/networks/available")
    assert status == 200 and nets["success"] is True and {n["name"] for n in nets["data"]} == {"prod-net", "test-net"}
    status, listed = await admin.get("/settings/cloudstack/networks")
    assert status == 200 and listed["count"] == 2 and listed["networks"] == nets["data"]
    zone = ids(cs)["zone"]
    assert len((await admin.get(f"/networks/available?zone_id={zone}"))[1]["data"]) == 2
    assert (await admin.get("/networks/available?zone_id=other"))[1]["data"] == []

    status, resolved = await admin.post("/networks/resolve", {"network_name": "test-net"})
    test_net = next(n.id for n in cs.inv.networks.values() if n.name == "test-net")
    assert status == 200 and resolved["data"]["network_id"] == test_net and resolved["data"]["network"]["name"] == \
        "test-net"
    status, err = await admin.post("/networks/resolve", {"network_name": "nope"})
    assert status == 404 and "nope" in err["details"]
    assert (await admin.post("/networks/resolve", {}))[0] == 400

    status, offerings = await admin.get("/service-offerings/available")
    assert status == 200 and {o["name"] for o in offerings["data"]} == {"Small Instance", "Medium Instance",
                                                                       "Large Instance"}


async def test_secret_keys_are_bound_to_their_config(db: Database, tmp_path: Path) -> None:
    configs = Configs(db, Audit(db), SecretBox.from_key_file(tmp_path / "secret.key"))
    made = [await configs.create({"name": n, "api_url": f"http://{n}.example/client/api", "api_key": f"key-{n}",
                                  "secret_key": f"secret-{n}", "zone": "z", "oma_vm_id": "vm"},
                                 make_default=False, actor="t") for n in ("a", "b")]
    a, b = [await configs.stored(m["id"]) for m in made]
    assert configs.endpoint_of(b).secret_key == "secret-b"
    # A's secret copied into B's row does not open there: it is never sent to B's URL.
    await db.execute("UPDATE ossea_configs SET secret_key_sealed = ? WHERE id = ?", (a.secret_key_sealed, b.id))
    with pytest.raises(SecretUnreadable) as caught:
        configs.endpoint_of(await configs.stored(b.id))
    assert isinstance(caught.value, Conflict) and "secret-a" not in str(caught.value)
    # Updating B's secret repairs it; a first-format secret is resealed once and still opens.
    await configs.update(b.id, {"secret_key": "secret-b2"}, make_default=False, actor="t")
    assert configs.endpoint_of(await configs.stored(b.id)).secret_key == "secret-b2"
    await db.execute("UPDATE ossea_configs SET secret_key_sealed = ? WHERE id = ?",
                     (first_format(tmp_path / "secret.key", "secret-a", PURPOSE), a.id))
    assert await configs.reseal_unbound() == 1 and await configs.reseal_unbound() == 0
    resealed = await configs.stored(a.id)
    assert resealed.secret_key_sealed.startswith("v2.") and configs.endpoint_of(resealed).secret_key == "secret-a"
