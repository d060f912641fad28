"""The OpenAPI documents tell the whole truth: schemathesis against the real daemons over their real sockets.

All four phases (examples, coverage, fuzzing, stateful) and every check but positive-data acceptance (our
schemas cannot say everything a handler refuses, e.g. "send vm_context_id or vm_context_ids, not both"),
with a fixed seed and a bounded number of examples. It walks the whole document, so every route added
later is covered without touching this file. 0 failures and 0 errors; on failure the report and the
daemons' logs are kept in .cache/schemathesis/<target>/ and the test says so.

omad is fuzzed as the administrator (an API token: a session token would be ended by the fuzzer's own
POST /auth/logout) with the VMA simulator behind it, after a credential, the simulator's VMs, a repository,
a schedule, a machine group and a policy were made: half of the path parameters the fuzzer sends name one
of them, so operations get past their 404. An agent is fuzzed over its unix socket (through a
TCP relay in this process, whose uid the agent allows) once it serves GET /openapi.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from oma_common.devrun import AGENTS

from ..rig import ROOT, Api, Stack
from .conftest import ODD_NAMES, VCENTER, manual

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ST = Path(sys.executable).with_name("st")
SEED = 20261206
MAX_EXAMPLES = int(os.environ.get("OMA_FUZZ_EXAMPLES", "15"))
REPORTS = ROOT / ".cache" / "schemathesis"

# What counts as a server error or a refusal here: the repository's schemathesis.toml (also read by `st run`
# by hand from the repository root).
CONFIG = (ROOT / "schemathesis.toml").read_text()


@dataclass
class Target:
    """What to fuzz: the document's URL, the base URL its paths are relative to, the headers to send, and
    values of path parameters that name existing resources."""

    name: str
    document: str
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    known: dict[str, list[str]] = field(default_factory=dict)

    def config(self) -> str:
        out = [CONFIG]
        for param, values in sorted(self.known.items()):
            out.append(f"[dictionaries.{param}]\nvalues = {json.dumps(values)}\n")
        if self.known:
            out.append("[parameters]")
            out += [f'"path.{param}" = {{ dictionary = "{param}", probability = 0.5 }}' for param in sorted(self.known)]
        return "\n".join(out) + "\n"


@dataclass
class Outcome:
    code: int
    output: str
    report_dir: Path

    def summary(self) -> str:
        tail = "\n".join(self.output.splitlines()[-60:])
        return f"schemathesis exited with {self.code}; report and output in {self.report_dir}\n{tail}"


async def run_schemathesis(target: Target, work: Path, *, max_examples: int = MAX_EXAMPLES,
                           extra: tuple[str, ...] = ()) -> Outcome:
    """`st run` as a child (the test's loop keeps serving the simulators and relays meanwhile).

    One worker: with two, hypothesis builds strategy descriptions in two threads at once and CPython 3.11's
    AST constructor sometimes fails with "recursion depth mismatch" (a schemathesis "Runtime Error").
    """
    work.mkdir(parents=True, exist_ok=True)
    config = work / "schemathesis.toml"
    config.write_text(target.config())
    report_dir = work / "report"
    args = [str(ST), "--no-color", "--config-file", str(config), "run", target.document, "--url", target.base_url,
            "--phases", "examples,coverage,fuzzing,stateful", "--checks", "all",
            "--exclude-checks", "positive_data_acceptance", "--seed", str(SEED), "--max-examples", str(max_examples),
            "--workers", "1", "--request-timeout", "30", "--output-truncate", "true",
            "--report", "junit,ndjson", "--report-dir", str(report_dir), *extra]
    for name, value in target.headers.items():
        args += ["-H", f"{name}: {value}"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=work)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    (work / "output.txt").write_text(text)
    assert proc.returncode is not None
    return Outcome(proc.returncode, text, report_dir)


def keep_report(name: str, work: Path) -> Path:
    """Copy a failed run's report where a developer (or CI's artefacts) can find it."""
    dest = REPORTS / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(work, dest)
    return dest


@pytest.fixture
async def unix_relay() -> AsyncIterator[list[asyncio.AbstractServer]]:
    servers: list[asyncio.AbstractServer] = []
    yield servers
    for s in servers:
        s.close()
        await s.wait_closed()


async def relay_to(socket_path: Path, servers: list[asyncio.AbstractServer]) -> str:
    """A TCP port on loopback whose connections are piped to the unix socket (schemathesis speaks TCP only)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, half_close: bool) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if half_close and writer.can_write_eof():
                writer.write_eof()
                return
        except (ConnectionError, OSError):
            pass
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            agent_r, agent_w = await asyncio.open_unix_connection(str(socket_path))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, agent_w, half_close=True), pipe(agent_r, client_w, half_close=False))
        agent_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    servers.append(server)
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


def admin_token(stack: Stack) -> str:
    done = stack.omactl("token", "create", "fuzz", "--role", "admin")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def seed(stack: Stack, token: str) -> dict[str, list[str]]:
    """Resources for the fuzzer to find; returns path parameter name → values."""
    async with Api(stack.url, token) as api:
        async def made(method: str, path: str, body: Any) -> Any:
            status, out = await api.request(method, path, json_body=body)
            assert status in (200, 201), (path, out)
            return out

        cred = await made("POST", "/vmware-credentials", {**manual(), "credential_name": "sim",
                                                          "vcenter_host": VCENTER, "is_default": True})
        added = await made("POST", "/discovery/add-vms", {**manual(), "vm_names": ODD_NAMES[:2]})
        contexts = [vm["context_id"] for vm in added["processed_vms"]]
        root = stack.state / "repositories" / "fuzz"
        root.mkdir(parents=True)
        repo = await made("POST", "/repositories", {"name": "fuzz", "type": "local",
                                                    "config": {"disk_path": str(root)}})
        schedule = await made("POST", "/schedules", {"name": "nightly", "cron_expression": "0 0 2 * * *",
                                                     "repository_id": repo["id"], "enabled": False})
        group = await made("POST", "/machine-groups", {"name": "fuzz", "schedule_id": schedule["id"]})
        await made("POST", f"/machine-groups/{group['id']}/vms", {"vm_context_ids": contexts})
        policy = await made("POST", "/policies", {"name": "fuzz", "primary_repository_id": repo["id"]})
        vms = (await made("GET", "/vms", None))["vms"]
    known = {"credential_id": [str(cred["id"])], "context_id": contexts, "vm_context_id": contexts,
             "vm_name": ODD_NAMES[:2], "vm_id": [vm["id"] for vm in vms][:2], "repository_id": [repo["id"]],
             "schedule_id": [schedule["id"]], "group_id": [group["id"]], "policy_id": [policy["id"]]}
    return {param: values for param, values in known.items() if values}


async def target_for(name: str, stack: Stack, servers: list[asyncio.AbstractServer]) -> Target:
    if name == "omad":
        token = admin_token(stack)
        return Target("omad", f"{stack.url}/api/v1/openapi.json", stack.url, {"Authorization": f"Bearer {token}"},
                      await seed(stack, token))
    base = await relay_to(stack.run_dir / f"{name}.sock", servers)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/openapi.json") as r:
        if r.status != 200:
            pytest.skip(f"{name} serves no OpenAPI document yet (GET /openapi.json: {r.status})")
        json.loads(await r.text())
    return Target(name, f"{base}/openapi.json", base)


def _require_schemathesis() -> None:
    if not ST.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("name", ["omad", *AGENTS])
async def test_the_document_tells_the_whole_truth(name: str, vstack: Stack, tmp_path: Path,
                                                  unix_relay: list[asyncio.AbstractServer]) -> None:
    _require_schemathesis()
    target = await target_for(name, vstack, unix_relay)
    outcome = await run_schemathesis(target, tmp_path / "st")
    if outcome.code != 0:
        shutil.copytree(vstack.state / "logs", tmp_path / "st" / "daemon-logs")
        kept = keep_report(name, tmp_path / "st")
        pytest.fail(outcome.summary().replace(str(outcome.report_dir), str(kept)), pytrace=False)
    undeclared = [line for line in (vstack.state / "logs" / "omad.log").read_text(errors="replace").splitlines()
                  if "undeclared status" in line]
    assert not undeclared, "\n".join(undeclared[:20])
