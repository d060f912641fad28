"""omad's CloudStack client (the `cs` library) against the simulator: signatures, async jobs, errors."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oma_common.errors import Invalid, TimedOut, Unavailable
from omad.clients.cloudstack import Client, Endpoint, Limits, normalise_api_url
from tests.sim.cloudstack import CloudStackSim

FAST = Limits(timeout=5, job_timeout=5, poll_interval=0.05)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[CloudStackSim]:
    async with CloudStackSim(tmp_path / "cs", tmp_path / "by-id") as s:
        yield s


def client(sim: CloudStackSim, *, secret: str | None = None, limits: Limits = FAST) -> Client:
    return Client(Endpoint(sim.endpoint, sim.api_key, sim.secret_key if secret is None else secret), limits)


async def test_reads_are_typed_and_signed(sim: CloudStackSim) -> None:
    c = client(sim)
    zones = await c.zones()
    assert [z.name for z in zones] == ["zone-sim-1"]
    assert {n.name for n in await c.networks()} == {"prod-net", "test-net"}
    assert all(n.zone_id == zones[0].id and n.zone_name == "zone-sim-1" for n in await c.networks())
    vms = {v.name: v for v in await c.virtual_machines()}
    assert vms["oma-appliance"].id == sim.appliance_vm_id
    assert [n.mac_address for n in vms["oma-appliance"].nics] == ["02:00:0a:01:00:0a"]
    assert [t.name for t in await c.templates()] == ["Debian 12"]
    assert {o.name for o in await c.service_offerings()} >= {"Small Instance", "Medium Instance"}
    assert any(d.is_customized for d in await c.disk_offerings())
    assert "listZones" in sim.commands.calls


async def test_a_wrong_secret_is_refused_by_signature(sim: CloudStackSim) -> None:
    with pytest.raises(Unavailable) as e:
        await client(sim, secret="not-the-secret").zones()
    assert e.value.code == "cloudstack_unauthorized"
    assert e.value.extra["cloudstack_errorcode"] == 401
    assert "unable to verify user credentials" in e.value.details  # CloudStack's own text
    wrong_key = Client(Endpoint(sim.endpoint, "someone-else", sim.secret_key), FAST)
    with pytest.raises(Unavailable, match="unable to verify"):
        await wrong_key.zones()


async def test_an_async_job_is_awaited_through_query_async_job_result(sim: CloudStackSim) -> None:
    sim.faults.job_seconds = 0.3
    c = client(sim)
    zone = (await c.zones())[0]
    custom = next(d for d in await c.disk_offerings() if d.is_customized)
    result = await c.job("createVolume", name="migration-x-disk-0", zoneid=zone.id, diskofferingid=custom.id, size=1)
    volume = result["volume"]
    assert volume["name"] == "migration-x-disk-0" and volume["size"] == 1024**3
    assert sim.commands.calls.count("queryAsyncJobResult") >= 2  # polled while pending, then done
    assert sim.volume(volume["id"]) is not None


async def test_a_failed_job_carries_cloudstacks_text(sim: CloudStackSim) -> None:
    c = client(sim)
    zone = (await c.zones())[0]
    custom = next(d for d in await c.disk_offerings() if d.is_customized)
    sim.faults.fail = {"createvolume": "primary storage pool-7 has no space left"}
    with pytest.raises(Unavailable) as e:
        await c.job("createVolume", name="v", zoneid=zone.id, diskofferingid=custom.id, size=1)
    assert "primary storage pool-7 has no space left" in e.value.details
    assert e.value.code == "cloudstack_internal_error" and e.value.extra["cloudstack_errorcode"] == 530


async def test_a_job_that_does_not_end_in_time_times_out(sim: CloudStackSim) -> None:
    sim.faults.job_seconds = 10
    c = client(sim, limits=Limits(timeout=5, job_timeout=1, poll_interval=0.05))
    zone = (await c.zones())[0]
    custom = next(d for d in await c.disk_offerings() if d.is_customized)
    with pytest.raises(TimedOut, match="did not finish"):
        await c.job("createVolume", name="v", zoneid=zone.id, diskofferingid=custom.id, size=1)


async def test_a_refused_parameter_is_invalid_with_cloudstacks_text(sim: CloudStackSim) -> None:
    with pytest.raises(Invalid) as e:
        await client(sim).listing("listTemplates")  # templatefilter is mandatory
    assert e.value.code == "cloudstack_invalid_parameter"
    assert "missing parameter templatefilter" in e.value.details
    with pytest.raises(Unavailable) as unknown:
        await client(sim).call("noSuchCommand")
    assert unknown.value.extra["cloudstack_errorcode"] == 432


async def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Client(Endpoint(f"http://127.0.0.1:{port}/client/api", "k", "s"), FAST)
    with pytest.raises(Unavailable, match="unreachable"):
        await c.zones()


def test_api_urls_are_normalised() -> None:
    assert normalise_api_url("cs.example.com:8080") == "http://cs.example.com:8080/client/api"
    assert normalise_api_url("https://cs.example.com/client/api/") == "https://cs.example.com/client/api"
    assert normalise_api_url("http://10.0.0.1:8080") == "http://10.0.0.1:8080/client/api"
    assert normalise_api_url("http://[fd00::5]:8080") == "http://[fd00::5]:8080/client/api"
    for bad in ("", "ftp://x", "http://", "a b", "http://h:99999", "0", "http://10.1", "http://a..b", "http://-a/"):
        with pytest.raises(Invalid):
            normalise_api_url(bad)
