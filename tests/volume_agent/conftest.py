"""Fixtures for volume-agent's CloudStack volumes: the simulator on its own thread, volume-agent configured for
it, and nbd-pool beside it (exporting from the simulator's device directory)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio

from oma_common.rpc import AgentClient

from ..nbd_pool.helpers import Agent, free_range
from ..rig import Stack
from ..sim.cloudstack import CloudStackSim


@dataclass
class VolumeEnv:
    sim: CloudStackSim
    stack: Stack
    agent: AgentClient
    pool: Agent
    ports: range

    @property
    def device_dir(self) -> Path:
        return self.sim.devices.device_dir

    @property
    def registry(self) -> Path:
        return self.stack.state / "volume-agent" / "vouched.json"

    @property
    def daemon(self) -> Any:
        return self.stack.daemons["volume-agent"]

    def configure(self, **options: Any) -> None:
        grace = options.get("grace", 5)
        appliance = options.get("appliance_vm_id", self.sim.appliance_vm_id)
        self.stack.add_config("volume-agent", "50-cloudstack.toml", f"""
device_dir = "{self.device_dir}"
device_timeout_seconds = {options.get("device_timeout", 10)}
reconcile_device_grace_seconds = {grace}
[cloudstack]
endpoint = "{self.sim.endpoint}"
api_key = "{self.sim.api_key}"
secret_key = "{options.get("secret_key", self.sim.secret_key)}"
appliance_vm_id = "{appliance}"
poll_interval_seconds = 0.05
job_timeout_seconds = 30
""")

    async def start_agent(self, **options: Any) -> None:
        self.configure(**options)
        await asyncio.to_thread(self.stack.start, "volume-agent")

    async def restart_agent(self, **options: Any) -> None:
        await self.agent.close()
        if self.daemon.running():
            await asyncio.to_thread(self.stack.stop, "volume-agent")
        await self.start_agent(**options)

    def freeze(self) -> None:
        os.kill(self.daemon.pid, signal.SIGSTOP)

    def kill9(self) -> None:
        self.daemon.stop(sig=signal.SIGKILL)

    async def until(self, what: Callable[[], Any], timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = what()
            if got:
                return got
            assert time.monotonic() < deadline, "timed out waiting"
            await asyncio.sleep(0.02)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        return await self.agent.call(method, path, json=body, timeout=60)


@pytest_asyncio.fixture
async def volume_env(cloudstack_sim: CloudStackSim, stack_config: Stack) -> AsyncIterator[VolumeEnv]:
    ports = free_range(8)
    stack_config.add_config("nbd-pool", "50-test.toml",
                            f'port_min = {ports.start}\nport_max = {ports.stop - 1}\n'
                            f'export_roots = ["{cloudstack_sim.devices.device_dir}"]\n')
    env = VolumeEnv(cloudstack_sim, stack_config,
                    AgentClient("volume-agent", stack_config.run_dir / "volume-agent.sock", timeout=60),
                    Agent(stack_config.run_dir / "nbd-pool.sock"), ports)
    await asyncio.to_thread(stack_config.start, "nbd-pool")
    try:
        yield env
    finally:
        if stack_config.daemons["nbd-pool"].running():
            status = await env.pool.ok("GET", "/ports/status")
            for job in sorted({a["job_id"] for a in status["allocations"]}):
                await env.pool.ok("POST", f"/jobs/{job}/release")
        await env.pool.close()
        await env.agent.close()
        await asyncio.to_thread(stack_config.stop)
