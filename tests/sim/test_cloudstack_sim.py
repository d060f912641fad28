"""The CloudStack simulator against the real `cs` client: signatures, async jobs, CloudStack's errors, and the
real block device that appears when a volume is attached to this appliance."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cs import AIOCloudStack, CloudStack, CloudStackApiException

from .cloudstack import CloudStackSim, serial_of
from .cloudstack import signature

MIB = 1024 * 1024


@pytest.fixture
async def sim(short_tmp: Path) -> AsyncIterator[CloudStackSim]:
    async with CloudStackSim(short_tmp / "cs", short_tmp / "by-id") as s:
        yield s


def client(sim: CloudStackSim, *, secret: str | None = None, key: str | None = None, **kw: Any) -> AIOCloudStack:
    return AIOCloudStack(sim.endpoint, key or sim.api_key, secret or sim.secret_key, poll_interval=0.05, **kw)


async def wait_job(cs: AIOCloudStack, jobid: str, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            j = await cs.queryAsyncJobResult(jobid=jobid)
            if j["jobstatus"] != 0:
                return j  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


async def custom_offering(cs: AIOCloudStack) -> str:
    offerings = (await cs.listDiskOfferings())["diskoffering"]
    return next(o["id"] for o in offerings if o["iscustomized"])


async def new_volume(cs: AIOCloudStack, name: str = "migration-vm1-disk-0", size_gb: int = 1) -> dict[str, Any]:
    zone = (await cs.listZones())["zone"][0]["id"]
    return await cs.createVolume(name=name, zoneid=zone, diskofferingid=await custom_offering(cs), size=size_gb,
                                 fetch_result=True)  # type: ignore[no-any-return]


def test_signatures_match_the_cs_library() -> None:
    params = {"command": "listVolumes", "apiKey": "k", "response": "json", "name": "a b*c/ü,+=",
              "expires": "2030-01-01T00:00:00+0000", "signatureVersion": "3"}
    signed = dict(params)
    CloudStack("http://x", "k", "s3cret")._sign(signed)
    assert signature.verify(signed, "s3cret")
    assert not signature.verify(signed, "other")
    assert not signature.verify({**signed, "name": "changed"}, "s3cret")
    late = {**params, "expires": "2001-01-01T00:00:00+0000"}
    CloudStack("http://x", "k", "s3cret")._sign(late)
    assert not signature.verify(late, "s3cret")


async def test_a_wrong_secret_or_key_is_refused_as_cloudstack_refuses_it(sim: CloudStackSim) -> None:
    for cs in (client(sim, secret="wrong"), client(sim, key="unknown-key")):
        with pytest.raises(CloudStackApiException) as info:
            await cs.listZones()
        assert info.value.response.status == 401
        assert info.value.error == {"uuidList": [], "errorcode": 401,
                                    "errortext": "unable to verify user credentials and/or request signature"}
    assert (await client(sim).listZones())["count"] == 1
    assert (await client(sim, method="post").listZones())["count"] == 1  # POST form works too


async def test_lists_have_cloudstacks_shapes(sim: CloudStackSim) -> None:
    cs = client(sim)
    assert (await cs.listCapabilities())["capability"]["cloudstackversion"]
    assert {o["name"]: (o["cpunumber"], o["memory"]) for o in (await cs.listServiceOfferings())["serviceoffering"]} \
        == {"Small Instance": (1, 1024), "Medium Instance": (2, 4096), "Large Instance": (4, 8192)}
    vms = (await cs.listVirtualMachines())["virtualmachine"]
    appliance = next(v for v in vms if v["id"] == sim.appliance_vm_id)
    assert appliance["nic"][0]["macaddress"] == "02:00:0a:01:00:0a"
    assert await cs.listSnapshots() == {}  # an empty list is {}
    assert len(await cs.listNetworks(fetch_list=True)) == 2
    assert len((await cs.listDomains())["domain"]) == 2
    assert (await cs.listTemplates(templatefilter="executable"))["template"][0]["isready"]
    roots = (await cs.listVolumes(virtualmachineid=sim.appliance_vm_id, type="ROOT"))["volume"]
    assert [v["deviceid"] for v in roots] == [0]


async def test_async_jobs_complete_and_report_pending_first(sim: CloudStackSim) -> None:
    cs = client(sim)
    sim.faults.job_seconds = 0.3
    zone = (await cs.listZones())["zone"][0]["id"]
    started = await cs.createVolume(name="v1", zoneid=zone, diskofferingid=await custom_offering(cs), size=2)
    assert set(started) == {"id", "jobid"}
    first = await cs.queryAsyncJobResult(jobid=started["jobid"])
    assert first["jobstatus"] == 0 and "jobresult" not in first
    done = await wait_job(cs, started["jobid"])
    assert done["jobstatus"] == 1 and done["jobresultcode"] == 0
    vol = done["jobresult"]["volume"]
    assert (vol["id"], vol["name"], vol["size"], vol["state"], vol["type"]) == (started["id"], "v1", 2 * 1024**3,
                                                                                 "Allocated", "DATADISK")
    sim.faults.job_seconds = 0
    assert (await new_volume(cs, "v2"))["volume"]["name"] == "v2"  # the client's own polling


async def test_errors_carry_cloudstacks_text(sim: CloudStackSim) -> None:
    cs = client(sim)
    zone = (await cs.listZones())["zone"][0]["id"]
    with pytest.raises(CloudStackApiException) as info:
        await cs.createVolume(name="x", zoneid=zone, diskofferingid=await custom_offering(cs))
    assert info.value.response.status == 431
    assert info.value.error["errorcode"] == 431
    assert info.value.error["errortext"] == "This disk offering requires a custom size specified"
    with pytest.raises(CloudStackApiException) as info:
        await cs.noSuchCommand()
    assert info.value.error["errorcode"] == 432
    vol = (await new_volume(cs))["volume"]
    sim.faults.fail["attachvolume"] = "Failed to attach volume migration-vm1-disk-0 to VM oma-appliance; " \
                                      "hypervisor refused"
    job = await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id)
    failed = await wait_job(cs, job["jobid"])
    assert (failed["jobstatus"], failed["jobresultcode"]) == (2, 530)
    assert failed["jobresult"] == {"errorcode": 530, "errortext": sim.faults.fail["attachvolume"]}
    with pytest.raises(CloudStackApiException) as info:
        await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id, fetch_result=True)
    assert "hypervisor refused" in info.value.error["errortext"]
    assert sim.volume(vol["id"])["state"] == "Allocated"  # nothing changed
    sim.faults.fail.clear()
    await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id, fetch_result=True)
    with pytest.raises(CloudStackApiException) as info:
        await cs.deleteVolume(id=vol["id"])
    assert info.value.error["errortext"] == "Please specify a volume that is not attached to any VM."
    await cs.detachVolume(id=vol["id"], fetch_result=True)


@pytest.mark.root
async def test_attaching_to_the_appliance_creates_a_real_device(sim: CloudStackSim, short_tmp: Path) -> None:
    cs = client(sim)
    vol = (await new_volume(cs))["volume"]
    link = short_tmp / "by-id" / f"virtio-{serial_of(vol['id'])}"
    assert len(serial_of(vol["id"])) == 20 and "-" not in serial_of(vol["id"])
    attached = (await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id,
                                      fetch_result=True))["volume"]
    assert (attached["virtualmachineid"], attached["deviceid"], attached["state"]) == (sim.appliance_vm_id, 1, "Ready")
    for _ in range(100):
        if link.exists():
            break
        await asyncio.sleep(0.02)
    device = os.path.realpath(link)
    assert stat.S_ISBLK(os.stat(device).st_mode) and device.startswith("/dev/loop")
    with open(device, "r+b") as f:
        assert f.seek(0, os.SEEK_END) == 1024**3
        f.seek(MIB)
        f.write(b"first" * 1000)
    snap = (await cs.createSnapshot(volumeid=vol["id"], fetch_result=True))["snapshot"]
    assert snap["state"] == "BackedUp" and snap["volumeid"] == vol["id"]
    with open(device, "r+b") as f:
        f.seek(MIB)
        f.write(b"later" * 1000)
    with pytest.raises(CloudStackApiException) as info:  # attached to a running VM: no revert
        await cs.revertSnapshot(id=snap["id"], fetch_result=True)
    assert "detach the volume or stop the VM" in info.value.error["errortext"]
    await cs.detachVolume(id=vol["id"], fetch_result=True)
    assert not link.exists() and not link.is_symlink()
    assert device not in subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME"], capture_output=True,
                                        text=True).stdout.split()
    await cs.revertSnapshot(id=snap["id"], fetch_result=True)
    await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id, fetch_result=True)
    for _ in range(100):
        if link.exists():
            break
        await asyncio.sleep(0.02)
    with open(link, "rb") as f:
        f.seek(MIB)
        assert f.read(5000) == b"first" * 1000


@pytest.mark.root
async def test_a_device_can_appear_late_or_never(sim: CloudStackSim, short_tmp: Path) -> None:
    cs = client(sim)
    sim.faults.device_delay_seconds = 0.5
    vol = (await new_volume(cs))["volume"]
    await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id, fetch_result=True)
    link = short_tmp / "by-id" / f"virtio-{serial_of(vol['id'])}"
    assert not link.exists()
    await asyncio.sleep(0.8)
    assert link.exists()
    await cs.detachVolume(id=vol["id"], fetch_result=True)
    sim.faults.device_never = True
    await cs.attachVolume(id=vol["id"], virtualmachineid=sim.appliance_vm_id, fetch_result=True)
    await asyncio.sleep(0.8)
    assert not link.exists()
    assert sim.attached_here() == [vol["id"]]


def test_the_threaded_fixture_answers_while_the_test_blocks(cloudstack_sim: CloudStackSim) -> None:
    cs = CloudStack(cloudstack_sim.endpoint, cloudstack_sim.api_key, cloudstack_sim.secret_key, poll_interval=0.05)
    zone = cs.listZones()["zone"][0]["id"]
    offering = next(o["id"] for o in cs.listDiskOfferings()["diskoffering"] if o["iscustomized"])
    vol = cs.createVolume(name="t", zoneid=zone, diskofferingid=offering, size=1, fetch_result=True)["volume"]
    assert cloudstack_sim.volume(vol["id"])["name"] == "t"


async def test_a_vm_is_deployed_stopped_given_a_root_volume_and_started(sim: CloudStackSim) -> None:
    cs = client(sim)
    zone = (await cs.listZones())["zone"][0]["id"]
    offering = (await cs.listServiceOfferings(name="Small Instance"))["serviceoffering"][0]["id"]
    template = (await cs.listTemplates(templatefilter="executable"))["template"][0]["id"]
    net = (await cs.listNetworks(name="test-net"))["network"][0]["id"]
    vm = (await cs.deployVirtualMachine(serviceofferingid=offering, templateid=template, zoneid=zone, networkids=net,
                                        name="web-01-test", startvm=False, fetch_result=True))["virtualmachine"]
    assert vm["state"] == "Stopped" and vm["nic"][0]["networkname"] == "test-net"
    root = (await cs.listVolumes(virtualmachineid=vm["id"], type="ROOT"))["volume"][0]
    await cs.detachVolume(id=root["id"], fetch_result=True)
    replacement = (await new_volume(cs, "migration-web-01-disk-0"))["volume"]
    attached = (await cs.attachVolume(id=replacement["id"], virtualmachineid=vm["id"], deviceid=0,
                                      fetch_result=True))["volume"]
    assert (attached["type"], attached["deviceid"]) == ("ROOT", 0)
    assert (await cs.startVirtualMachine(id=vm["id"], fetch_result=True))["virtualmachine"]["state"] == "Running"
    with pytest.raises(CloudStackApiException, match="stopped"):
        await cs.detachVolume(id=replacement["id"], fetch_result=True)
    await cs.stopVirtualMachine(id=vm["id"], fetch_result=True)
    await cs.destroyVirtualMachine(id=vm["id"], expunge=True, fetch_result=True)
    assert await cs.listVirtualMachines(id=vm["id"]) == {}


async def test_faults_are_set_and_state_read_over_the_admin_endpoint(sim: CloudStackSim) -> None:
    base = sim.endpoint.removesuffix("/client/api")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/admin/faults", json={"job_seconds": 0.2, "fail": {"createSnapshot": "no"},
                                                           "device_never": True}) as r:
            assert r.status == 200 and (await r.json())["fail"] == {"createsnapshot": "no"}
        assert sim.faults.job_seconds == 0.2 and sim.faults.device_never
        await new_volume(client(sim), "v-admin")
        async with http.get(f"{base}/admin/state") as r:
            state = await r.json()
    assert state["appliance_vm_id"] == sim.appliance_vm_id
    assert "v-admin" in [v["name"] for v in state["volumes"]] and "createVolume" in state["calls"]
