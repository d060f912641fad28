"""volume-agent's CloudStack volumes, end to end: the real agent over its socket against the CloudStack
simulator, real loop devices behind the attached volumes, nbd-pool exporting them, qemu-io writing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from oma_common.errors import Conflict, NotFound, TimedOut, Unavailable

from volume_agent.adapters.openers import use_of

from ..nbd_pool.helpers import ash, url
from ..sim.cloudstack import serial_of
from .conftest import VolumeEnv

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MIB = 1024 * 1024
GIB = 1024**3


async def export(env: VolumeEnv, job: str, path: str, name: str) -> dict[str, Any]:
    alloc = await env.pool.ok("POST", "/ports/allocate", {"job_id": job, "count": 1, "export_names": [name]})
    port = alloc["allocated_ports"][0]["port"]
    return await env.pool.ok("POST", "/exports", {"export_name": name, "port": port, "path": path,
                                                  "job_id": job})  # type: ignore[no-any-return]


async def qemu_io(env: VolumeEnv, vol: dict[str, Any], command: str) -> None:
    """Run one qemu-io command on the volume's device through an nbd-pool export of it, then release it."""
    e = await export(env, "job-vol", vol["link_path"], "vol")
    assert e["format"] == "raw" and e["size"] == vol["size_bytes"]
    try:
        await ash("qemu-io", "-f", "raw", "-c", command, url(e["port"], "vol"))
    finally:
        await env.pool.ok("POST", "/jobs/job-vol/release")


def loops_on(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"], capture_output=True,
                         text=True).stdout
    return [line.split()[0] for line in out.splitlines() if str(path) in line]


def registry(env: VolumeEnv) -> list[dict[str, Any]]:
    return json.loads(env.registry.read_text())["items"]  # type: ignore[no-any-return]


async def create(env: VolumeEnv, vm: str = "vm1", unit: int = 0, size: int = 1 * GIB - 5) -> dict[str, Any]:
    return await env.call("POST", "/volumes", {"vm_name": vm, "disk_unit": unit, "size_bytes": size})  # type: ignore


async def test_write_detach_reattach_snapshot_revert(volume_env: VolumeEnv) -> None:
    env = volume_env
    await env.start_agent()
    vol = await create(env)
    assert vol["name"] == "migration-vm1-disk-0" and vol["size_bytes"] == GIB and not vol["attached_here"]
    assert env.sim.volume(vol["volume_id"])["state"] == "Allocated"
    with pytest.raises(Conflict):
        await create(env)

    vol = await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    link = env.device_dir / f"virtio-{serial_of(vol['volume_id'])}"
    assert vol["attached_here"] and vol["link_path"] == str(link) and vol["device_path"] == os.path.realpath(link)
    assert vol["serial"] == serial_of(vol["volume_id"])
    devices = (await env.call("GET", "/devices"))["devices"]
    assert [(d["volume_id"], d["device_path"]) for d in devices] == [(vol["volume_id"], vol["device_path"])]
    assert [i["volume_id"] for i in registry(env)] == [vol["volume_id"]]
    assert env.sim.volume(vol["volume_id"])["virtualmachineid"] == env.sim.appliance_vm_id

    await qemu_io(env, vol, "write -P 0xab 0 64M")
    await export(env, "job-busy", vol["link_path"], "busy")  # a running export holds the device open
    no_proc = env.stack.state / "no-proc"  # as the agent sees it without CAP_SYS_PTRACE: QEMU's lock only
    no_proc.mkdir()
    assert use_of(Path(vol["device_path"]), proc=no_proc).describe().startswith("a QEMU process")
    with pytest.raises(Conflict, match=r"is open by \d+ \(qemu-nbd\); stop its exports"):
        await env.call("POST", f"/volumes/{vol['volume_id']}/detach")
    assert [i["volume_id"] for i in registry(env)] == [vol["volume_id"]]  # still vouched for
    await env.pool.ok("POST", "/jobs/job-busy/release")
    vol = await env.call("POST", f"/volumes/{vol['volume_id']}/detach")
    assert not vol["attached_here"] and vol["device_path"] is None
    assert not link.exists() and registry(env) == [] and (await env.call("GET", "/devices"))["devices"] == []
    assert env.sim.volume(vol["volume_id"]).get("virtualmachineid") is None

    vol = await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    await qemu_io(env, vol, "read -P 0xab 0 64M")
    # The sync stamp lives in the device's last 4 KiB: none yet, then the one written, flushed to the volume.
    stamp_url = f"/volumes/{vol['volume_id']}/stamp"
    assert await env.call("GET", stamp_url) == {"volume_id": vol["volume_id"], "stamp": "",
                                                "offset": vol["size_bytes"] - 4096}
    await env.call("PUT", stamp_url, {"stamp": "1" * 32})
    assert (await env.call("GET", stamp_url))["stamp"] == "1" * 32
    with open(env.sim.devices.volume_file(vol["volume_id"]), "rb") as f:  # on the volume itself, not only the API's word
        assert os.pread(f.fileno(), 4096, vol["size_bytes"] - 4096).startswith(b"OMA-SYNC-STAMP/1\n" + b"1" * 32 + b"\n")

    snap = await env.call("POST", f"/volumes/{vol['volume_id']}/snapshots", {})
    assert snap["volume_id"] == vol["volume_id"] and snap["state"] == "BackedUp"
    await qemu_io(env, vol, "write -P 0xcd 0 64M")
    await env.call("PUT", stamp_url, {"stamp": "2" * 32})
    vol = await env.call("POST", f"/volumes/{vol['volume_id']}/revert", {"snapshot_id": snap["snapshot_id"]})
    assert vol["attached_here"] and vol["snapshots"] == [snap["snapshot_id"]]
    await qemu_io(env, vol, "read -P 0xab 0 64M")
    assert (await env.call("GET", stamp_url))["stamp"] == "1" * 32  # the snapshot's moment came back with it

    with pytest.raises(Conflict, match="detach it first"):
        await env.call("DELETE", f"/volumes/{vol['volume_id']}")
    await env.call("DELETE", f"/volumes/{vol['volume_id']}/snapshots/{snap['snapshot_id']}")
    await env.call("POST", f"/volumes/{vol['volume_id']}/detach")
    with pytest.raises(Conflict, match="attach it first"):
        await env.call("GET", stamp_url)
    gone = await env.call("DELETE", f"/volumes/{vol['volume_id']}")
    assert gone["deleted"] and env.sim.volume(vol["volume_id"]) is None
    assert (await env.call("GET", "/volumes"))["volumes"] == []


async def test_cloudstack_errors_reach_the_caller_with_their_text(volume_env: VolumeEnv) -> None:
    env = volume_env
    await env.start_agent(device_timeout=1)
    vol = await create(env)
    env.sim.faults.fail["attachvolume"] = "Failed to attach volume: the hypervisor said no"
    with pytest.raises(Unavailable) as info:
        await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    assert info.value.details == "Failed to attach volume: the hypervisor said no"
    assert info.value.extra["cloudstack_errorcode"] == 530
    env.sim.faults.fail.clear()
    env.sim.faults.device_never = True
    with pytest.raises(TimedOut, match="did not appear"):
        await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    assert env.sim.volume(vol["volume_id"]).get("virtualmachineid") is None  # undone
    view = await env.call("GET", f"/volumes/{vol['volume_id']}")
    assert not view["attached_here"] and view["operation"] is None
    with pytest.raises(NotFound):
        await env.call("POST", "/volumes/00000000-0000-0000-0000-000000000000/attach")


async def test_the_appliance_is_found_by_mac_and_a_wrong_secret_is_reported(volume_env: VolumeEnv) -> None:
    env = volume_env
    ours = next(p.read_text().strip() for p in Path("/sys/class/net").glob("*/address")
                if p.read_text().strip() not in ("", "00:00:00:00:00:00"))
    env.sim.inv.vms[env.sim.appliance_vm_id].nics[0].macaddress = ours
    await env.start_agent(appliance_vm_id="")
    health = await env.call("GET", "/health")
    assert health["appliance_vm_id"] == env.sim.appliance_vm_id and health["cloudstack_configured"]
    await env.restart_agent(secret_key="wrong")  # starts anyway (reconciles against /dev only)
    with pytest.raises(Unavailable) as info:
        await create(env)
    assert "unable to verify user credentials and/or request signature" in info.value.details


async def test_kill9_between_cloudstacks_attach_and_the_device(volume_env: VolumeEnv) -> None:
    env = volume_env
    await env.start_agent(grace=10)
    one, two = await create(env, unit=0), await create(env, unit=1)
    for vol, never in ((one, False), (two, True)):
        env.sim.faults.job_seconds, env.sim.faults.device_never = 1.0, never
        n = env.sim.commands.calls.count("attachVolume")
        task = asyncio.create_task(env.call("POST", f"/volumes/{vol['volume_id']}/attach"))
        await env.until(lambda: env.sim.commands.calls.count("attachVolume") > n)
        env.freeze()  # the job runs on in CloudStack; the agent does not see it end
        await env.until(lambda: vol["volume_id"] in env.sim.attached_here())
        env.kill9()
        with pytest.raises(Unavailable):
            await task
        env.sim.faults.job_seconds = 0
        await env.restart_agent(grace=1 if never else 10)
        view = await env.call("GET", f"/volumes/{vol['volume_id']}")
        link = env.device_dir / f"virtio-{serial_of(vol['volume_id'])}"
        assert view["operation"] is None
        if never:  # attached in CloudStack with no device: detached there, nothing vouched for
            assert not view["attached_here"] and vol["volume_id"] not in env.sim.attached_here()
            assert not link.exists()
        else:  # the device did appear: the attach is completed
            assert view["attached_here"] and view["device_path"] == os.path.realpath(link)
            assert vol["volume_id"] in env.sim.attached_here()
        assert [i["volume_id"] for i in registry(env)] == [one["volume_id"]]


async def test_kill9_between_detach_and_the_records_update(volume_env: VolumeEnv) -> None:
    env = volume_env
    await env.start_agent()
    vol = await create(env)
    vol = await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    link = Path(vol["link_path"])
    env.sim.faults.job_seconds = 1.0
    task = asyncio.create_task(env.call("POST", f"/volumes/{vol['volume_id']}/detach"))
    await env.until(lambda: "detachVolume" in env.sim.commands.calls)
    env.freeze()
    assert registry(env) == []  # vouching withdrawn before CloudStack was asked
    await env.until(lambda: vol["volume_id"] not in env.sim.attached_here())
    env.kill9()
    with pytest.raises(Unavailable):
        await task
    saved = json.loads((env.stack.state / "volume-agent" / "volumes.json").read_text())["items"]
    assert saved[0]["operation"]["kind"] == "detach" and saved[0]["attached_here"] is False
    env.sim.faults.job_seconds = 0
    await env.restart_agent()
    view = await env.call("GET", f"/volumes/{vol['volume_id']}")
    assert not view["attached_here"] and view["operation"] is None and view["device_path"] is None
    assert not link.exists() and registry(env) == []
    assert env.sim.volume(vol["volume_id"]).get("virtualmachineid") is None


async def test_a_device_whose_volume_is_gone_is_not_vouched_for(volume_env: VolumeEnv, short_tmp: Path) -> None:
    env = volume_env
    await env.start_agent()
    vol = await create(env)
    vol = await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    await asyncio.to_thread(env.stack.stop, "volume-agent")
    # Behind the agent's back: the volume is detached and deleted, and a stale link to another device stays.
    env.sim.threaded.call(env.sim.commands.dispatch("detachVolume", {"id": vol["volume_id"]}))
    await env.until(lambda: env.sim.volume(vol["volume_id"]).get("virtualmachineid") is None)
    env.sim.threaded.call(env.sim.commands.dispatch("deleteVolume", {"id": vol["volume_id"]}))
    stale = short_tmp / "stale.raw"
    stale.write_bytes(bytes(MIB))
    loop = subprocess.run(["losetup", "--show", "-f", stale], check=True, capture_output=True, text=True).stdout.strip()
    try:
        Path(vol["link_path"]).symlink_to(loop)
        await env.restart_agent()
        assert (await env.call("GET", "/volumes"))["volumes"] == []
        assert registry(env) == [] and (await env.call("GET", "/devices"))["devices"] == []
        log = (env.stack.state / "logs" / "volume-agent.log").read_text()
        assert f"volume {vol['volume_id']}: CloudStack has no such volume any more" in log
    finally:
        Path(vol["link_path"]).unlink(missing_ok=True)
        subprocess.run(["losetup", "-d", loop], check=False)
    assert loops_on(stale) == []


async def test_the_appliances_own_disks_are_never_taken(volume_env: VolumeEnv) -> None:
    env = volume_env
    await env.start_agent()
    root = next(v for v in env.sim.inv.volumes.values() if v.virtualmachineid == env.sim.appliance_vm_id)
    with pytest.raises(Conflict, match="ROOT disk of oma-appliance"):
        await env.call("POST", f"/volumes/{root.id}/attach")
    # A data volume someone else attached to this appliance (it may hold this system's data) is left alone.
    vol = await create(env, unit=3)
    await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    await env.call("POST", f"/volumes/{vol['volume_id']}/detach")
    await asyncio.to_thread(env.stack.stop, "volume-agent")
    (env.stack.state / "volume-agent" / "volumes.json").unlink()  # the agent forgets it ever had it
    env.sim.threaded.call(env.sim.commands.dispatch("attachVolume", {"id": vol["volume_id"],
                                                                     "virtualmachineid": env.sim.appliance_vm_id}))
    await env.until(lambda: vol["volume_id"] in env.sim.attached_here())
    await env.restart_agent()
    with pytest.raises(Conflict, match="not by volume-agent"):
        await env.call("POST", f"/volumes/{vol['volume_id']}/attach")
    listing = await env.call("GET", "/volumes")
    assert listing == {"volumes": [], "unmanaged_attached": [vol["volume_id"]]}
    assert (await env.call("GET", "/devices"))["devices"] == [] and registry(env) == []


async def test_an_interrupted_create_is_kept_or_forgotten_by_what_cloudstack_has(volume_env: VolumeEnv) -> None:
    env = volume_env
    zone = next(iter(env.sim.inv.zones))
    offering = next(o.id for o in env.sim.inv.disk_offerings.values() if o.iscustomized)
    env.sim.threaded.call(env.sim.commands.dispatch("createVolume", {
        "name": "migration-vm9-disk-0", "zoneid": zone, "diskofferingid": offering, "size": "2"}))
    state = env.stack.state / "volume-agent"
    state.mkdir(mode=0o700, exist_ok=True)
    pending = [{"name": name, "volume_id": "", "size_bytes": 2 * GIB,
                "operation": {"kind": "create", "started_at": 1.0}}
               for name in ("migration-vm9-disk-0", "migration-vm9-disk-1")]
    (state / "volumes.json").write_text(json.dumps({"kind": "volumes", "version": 1, "items": pending}))
    await env.start_agent()
    (kept,) = (await env.call("GET", "/volumes"))["volumes"]
    assert kept["name"] == "migration-vm9-disk-0" and kept["operation"] is None and kept["size_bytes"] == 2 * GIB
    assert env.sim.volume(kept["volume_id"])["name"] == "migration-vm9-disk-0"
    log = (env.stack.state / "logs" / "volume-agent.log").read_text()
    assert "migration-vm9-disk-1: an interrupted create left no volume in CloudStack; forgotten" in log


async def test_operations_on_one_volume_queue_behind_each_other(volume_env: VolumeEnv) -> None:
    env = volume_env
    await env.start_agent()
    vol = await create(env)
    env.sim.faults.job_seconds = 0.3
    path = f"/volumes/{vol['volume_id']}"
    attached = asyncio.create_task(env.call("POST", f"{path}/attach"))
    await env.until(lambda: "attachVolume" in env.sim.commands.calls)
    detached, snap = await asyncio.gather(env.call("POST", f"{path}/detach"),
                                          env.call("POST", f"{path}/snapshots", {}))
    assert (await attached)["attached_here"] and not detached["attached_here"]
    assert snap["volume_id"] == vol["volume_id"]
    # Each call waited for the one before it: never two CloudStack jobs on the volume at once.
    jobs = sorted((j for j in env.sim.inv.jobs.values() if j.instanceid in (vol["volume_id"], snap["snapshot_id"])
                   and not j.cmd.endswith("CreateVolumeCmd")), key=lambda j: j.started)
    assert [j.cmd.rsplit(".", 1)[1] for j in jobs][0] == "AttachVolumeCmd" and len(jobs) == 3
    for before, after in zip(jobs, jobs[1:]):
        assert before.finished is not None and before.finished <= after.started


async def test_a_volume_detached_or_deleted_in_cloudstack_directly_is_noticed_while_running(
        volume_env: VolumeEnv) -> None:
    """Outside the appliance, while the agent runs: the record follows CloudStack as soon as the volume is asked
    about, and its device is no longer vouched for (nbd-pool would refuse it rather than fail on a missing
    device)."""
    env = volume_env
    await env.start_agent()
    one, two = await create(env, unit=0), await create(env, unit=1)
    one = await env.call("POST", f"/volumes/{one['volume_id']}/attach")
    two = await env.call("POST", f"/volumes/{two['volume_id']}/attach")
    await qemu_io(env, one, "write -P 0x5a 0 1M")
    assert sorted(i["volume_id"] for i in registry(env)) == sorted([one["volume_id"], two["volume_id"]])
    calls = len(env.sim.commands.calls)
    for _ in range(3):  # a device still there costs no CloudStack call
        assert (await env.call("GET", f"/volumes/{one['volume_id']}"))["attached_here"]
    assert len(env.sim.commands.calls) == calls

    # Detached in CloudStack: the simulator removes the link and its loop device, as the hypervisor would.
    env.sim.threaded.call(env.sim.commands.dispatch("detachVolume", {"id": one["volume_id"]}))
    await env.until(lambda: one["volume_id"] not in env.sim.attached_here())
    assert not Path(one["link_path"]).exists() and loops_on(env.sim.devices.volume_file(one["volume_id"])) == []
    view = await env.call("GET", f"/volumes/{one['volume_id']}")
    assert not view["attached_here"] and view["device_path"] is None and view["operation"] is None
    assert [i["volume_id"] for i in registry(env)] == [two["volume_id"]]
    assert [d["volume_id"] for d in (await env.call("GET", "/devices"))["devices"]] == [two["volume_id"]]
    with pytest.raises(Conflict, match="attach it first"):
        await env.call("GET", f"/volumes/{one['volume_id']}/stamp")
    log = (env.stack.state / "logs" / "volume-agent.log").read_text()
    assert f"volume {one['volume_id']}: recorded as attached here, but" in log
    assert f"volume {one['volume_id']}: CloudStack has it detached; recorded as detached" in log
    # Attached again through the agent: the same data, vouched for again (perhaps on another device).
    one = await env.call("POST", f"/volumes/{one['volume_id']}/attach")
    assert one["attached_here"] and os.path.exists(one["link_path"])
    await qemu_io(env, one, "read -P 0x5a 0 1M")
    assert sorted(i["volume_id"] for i in registry(env)) == sorted([one["volume_id"], two["volume_id"]])

    # Detached and deleted in CloudStack: the record is dropped when the list is read.
    env.sim.threaded.call(env.sim.commands.dispatch("detachVolume", {"id": two["volume_id"]}))
    await env.until(lambda: two["volume_id"] not in env.sim.attached_here())
    env.sim.threaded.call(env.sim.commands.dispatch("deleteVolume", {"id": two["volume_id"]}))
    assert env.sim.volume(two["volume_id"]) is None
    listing = await env.call("GET", "/volumes")
    assert [v["volume_id"] for v in listing["volumes"]] == [one["volume_id"]]
    assert [i["volume_id"] for i in registry(env)] == [one["volume_id"]]
    with pytest.raises(NotFound):
        await env.call("GET", f"/volumes/{two['volume_id']}")


async def test_a_size_or_id_no_cloudstack_volume_can_have_is_refused_before_cloudstack_is_asked(
        volume_env: VolumeEnv) -> None:
    """Every number and id omad sends is bounded: a size beyond any disk (here one no float can hold) or an
    offering or zone id that is not a CloudStack id is a 400, never a 500, and creates nothing."""
    from oma_common.errors import Invalid

    env = volume_env
    await env.start_agent()
    base = {"vm_name": "vm-big", "disk_unit": 0, "size_bytes": 1024**3}
    for override in ({"size_bytes": 10**400}, {"size_bytes": 2**64}, {"disk_offering_id": "x" * 100000},
                     {"zone_id": "zone&command=deleteVolume"}):
        with pytest.raises(Invalid, match="invalid body"):
            await env.call("POST", "/volumes", {**base, **override})
    assert (await env.call("GET", "/volumes"))["volumes"] == []
