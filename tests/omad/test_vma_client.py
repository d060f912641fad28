"""The VMA client against the VMA simulator: answers, and every kind of failure as a domain error."""

from __future__ import annotations

import socket
import time

import pytest

from oma_common import errors
from omad.clients.vma import VmaClient
from omad.config import VmaConfig
from tests.sim.vma import VMASim

from .conftest import ODD_NAMES, PASSWORD, USER, VCENTER


def client(url: str, **kw: float) -> VmaClient:
    cfg = VmaConfig(url=url, timeout_seconds=kw.get("timeout", 1.0), discover_timeout_seconds=kw.get("timeout", 1.0),
                    connect_timeout_seconds=1.0, retries=int(kw.get("retries", 2)), retry_delay_seconds=0.01)
    return VmaClient(cfg)


async def discover(c: VmaClient, **kw: str) -> dict:
    args = {"vcenter": VCENTER, "username": USER, "password": PASSWORD, "datacenter": "DC1", **kw}
    return await c.discover(**args)


async def test_discover_and_health(vma: VMASim) -> None:
    c = client(vma.url + "/")
    try:
        body = await discover(c)
        assert [vm["name"] for vm in body["vms"]] == ODD_NAMES
        assert body["vcenter"] == {"host": VCENTER, "datacenter": "DC1"}
        assert (await c.health())["status"] == "healthy"
        sent = vma.state.requests_to("discover")[0].json
        assert sent == {"vcenter": VCENTER, "username": USER, "password": PASSWORD, "datacenter": "DC1"}
    finally:
        await c.close()


async def test_vma_down_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = client(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(errors.Unavailable) as e:
            await discover(c)
        assert e.value.message == "VMA unreachable" and f"127.0.0.1:{port}" in e.value.details
    finally:
        await c.close()


async def test_vma_error_text_is_passed_on(vma: VMASim) -> None:
    c = client(vma.url)
    try:
        with pytest.raises(errors.Unavailable) as e:
            await discover(c, password="wrong")
        assert "incorrect user name or password" in e.value.message and e.value.extra["vma_status"] == 500
        vma.state.faults.error("discover", 502, "Bad Gateway: tunnel to vCenter broken")
        with pytest.raises(errors.Unavailable) as e:
            await discover(c)
        assert e.value.message == "Bad Gateway: tunnel to vCenter broken"
        assert len(vma.state.requests_to("discover")) == 2  # an answer, even an error, is never retried
    finally:
        await c.close()


async def test_slow_vma_times_out_without_retry(vma: VMASim) -> None:
    vma.state.faults.delay("discover", 5)
    c = client(vma.url, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(errors.TimedOut) as e:
            await discover(c)
        assert time.monotonic() - started < 2 and "0.5 s" in e.value.details
        assert len(vma.state.requests_to("discover")) == 1
    finally:
        await c.close()


async def test_malformed_and_unexpected_bodies(vma: VMASim) -> None:
    c = client(vma.url)
    try:
        vma.state.faults.malformed("discover", times=1)
        with pytest.raises(errors.Unavailable, match="malformed JSON"):
            await discover(c)
        vma.state.faults.malformed("discover", body='{"vms": "all of them"}', times=1)
        with pytest.raises(errors.Unavailable, match="unexpected discovery body"):
            await discover(c)
    finally:
        await c.close()


async def test_dropped_connections_are_retried_only_when_idempotent(vma: VMASim) -> None:
    c = client(vma.url, retries=2)
    try:
        vma.state.faults.drop("discover", times=2)
        assert len((await discover(c))["vms"]) == 3  # two drops, then the answer
        assert len(vma.state.requests_to("discover")) == 3
        vma.state.faults.drop("vm/*/power-off", times=1)
        vm_id = vma.state.inventory.vms[0].id
        with pytest.raises(errors.Unavailable, match="VMA unreachable"):
            await c.call("POST", f"/vm/{vm_id}/power-off", json={"vm_id": vm_id}, idempotent=False)
        assert len(vma.state.requests_to("vm/*/power-off")) == 1
    finally:
        await c.close()


async def test_vma_not_found_is_not_found(vma: VMASim) -> None:
    c = client(vma.url)
    try:
        with pytest.raises(errors.NotFound):
            await c.call("GET", "/progress/job-none", idempotent=True)
    finally:
        await c.close()
