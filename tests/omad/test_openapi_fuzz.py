"""The OpenAPI documents tell the whole truth: schemathesis against the real daemons over their real sockets.

All four phases (examples, coverage, fuzzing, stateful) and every check but positive-data acceptance (our
schemas cannot say everything a handler refuses, e.g. "send vm_context_id or vm_context_ids, not both"),
with a fixed seed and a bounded number of examples. It walks the whole document, so every route added
later is covered without touching this file. 0 failures and 0 errors; on failure the report is kept in
.cache/schemathesis/<target>/ and the test says so.

omad is fuzzed as the administrator (an API token: a session token would be ended by the fuzzer's own
POST /auth/logout) with the VMA simulator behind it. An agent is fuzzed over its unix socket (through a
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

import aiohttp
import pytest

from oma_common.devrun import AGENTS

from ..rig import ROOT, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ST = Path(sys.executable).with_name("st")
SEED = 20261206
MAX_EXAMPLES = int(os.environ.get("OMA_FUZZ_EXAMPLES", "15"))
REPORTS = ROOT / ".cache" / "schemathesis"

# A 503/504 is a declared answer (the VMA or an agent failed, as the simulator's VMA does for a made-up
# vCenter); status_code_conformance still fails an undeclared one, and every 500 fails.
CONFIG = """\
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503", "504"]
"""


@dataclass
class Target:
    """What to fuzz: the document's URL, the base URL its paths are relative to, and the headers to send."""

    name: str
    document: str
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)


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
    """`st run` as a child (the test's loop keeps serving the simulators and relays meanwhile)."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "schemathesis.toml"
    config.write_text(CONFIG)
    report_dir = work / "report"
    args = [str(ST), "--no-color", "--config-file", str(config), "run", target.document, "--url", target.base_url,
            "--phases", "examples,coverage,fuzzing,stateful", "--checks", "all",
            "--exclude-checks", "positive_data_acceptance", "--seed", str(SEED), "--max-examples", str(max_examples),
            "--workers", "2", "--request-timeout", "30", "--output-truncate", "true",
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


async def target_for(name: str, stack: Stack, servers: list[asyncio.AbstractServer]) -> Target:
    if name == "omad":
        return Target("omad", f"{stack.url}/api/v1/openapi.json", stack.url,
                      {"Authorization": f"Bearer {admin_token(stack)}"})
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
        kept = keep_report(name, tmp_path / "st")
        pytest.fail(outcome.summary().replace(str(outcome.report_dir), str(kept)), pytrace=False)
    undeclared = [line for line in (vstack.state / "logs" / "omad.log").read_text(errors="replace").splitlines()
                  if "undeclared status" in line]
    assert not undeclared, "\n".join(undeclared[:20])
