"""Each agent's wire contract is declared once (oma_common.contracts.<agent>): the agent's handlers and omad's
client use the very same classes, and each running agent serves its OpenAPI document, generated from those
declarations, on its own socket."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType

import pytest

import nbd_pool.api
import omad.clients.nbdpool
import omad.clients.restore_mounter
import omad.clients.volume_agent
import restore_mounter.api
import volume_agent.api
from oma_common.contracts import nbd_pool as nbd_pool_contract
from oma_common.contracts import restore_mounter as restore_mounter_contract
from oma_common.contracts import volume_agent as volume_agent_contract
from oma_common.contracts import volume_agent_volumes
from oma_common.devrun import AGENTS
from oma_common.web import collect

from ..rig import Stack
from .test_lifecycle import unix_get

# agent → (its contract modules, its API module, omad's client module)
SIDES: dict[str, tuple[tuple[ModuleType, ...], ModuleType, ModuleType]] = {
    "nbd-pool": ((nbd_pool_contract,), nbd_pool.api, omad.clients.nbdpool),
    "restore-mounter": ((restore_mounter_contract,), restore_mounter.api, omad.clients.restore_mounter),
    "volume-agent": ((volume_agent_contract, volume_agent_volumes), volume_agent.api, omad.clients.volume_agent),
}


def shapes(*modules: ModuleType) -> dict[str, type]:
    return {name: obj for module in modules for name, obj in vars(module).items()
            if dataclasses.is_dataclass(obj) and isinstance(obj, type)}


def declared(api_module: ModuleType) -> set[type]:
    """Every body, query and answer class on the routes of the API module's classes."""
    out: set[type] = set()
    for cls in vars(api_module).values():
        if not isinstance(cls, type) or cls.__module__ != api_module.__name__:
            continue
        for fn in vars(cls).values():
            for spec in getattr(fn, "__oma_routes__", []):
                out |= {c for c in (spec.body, spec.query, spec.response) if c is not None}
    return out


@pytest.mark.parametrize("agent", AGENTS)
def test_handlers_and_omads_client_import_the_same_contract_classes(agent: str) -> None:
    contracts, api, client = SIDES[agent]
    on_routes = declared(api)
    assert on_routes, f"{api.__name__} declares no shapes"
    contract = shapes(*contracts)
    contract_classes = set(contract.values())
    assert on_routes <= contract_classes, f"shapes declared outside the contract: {on_routes - contract_classes}"
    # No module keeps a copy: a class of the same name on either side is the contract's own object.
    for side in (api, client):
        for name, cls in shapes(side).items():
            if name in contract:
                assert cls is contract[name], f"{side.__name__}.{name} is a copy"
    used_by_client = {cls for cls in shapes(client).values() if cls in contract_classes}
    assert used_by_client, f"{client.__name__} does not use the contract"
    assert used_by_client & on_routes, "the client and the handlers share no class"


@pytest.mark.parametrize("agent", AGENTS)
def test_omads_client_parses_every_answer_into_the_contract(agent: str) -> None:
    """No answer is handed on as plain data: every call goes through AgentClient.typed (or the descriptor
    exchange, or a stream), and no method returns untyped data."""
    client = SIDES[agent][2]
    source = inspect.getsource(client)
    assert ".call(" not in source, f"{client.__name__} makes an untyped call"
    for cls in vars(client).values():
        if isinstance(cls, type) and cls.__module__ == client.__name__:
            for name, fn in vars(cls).items():
                if inspect.iscoroutinefunction(fn):
                    returns = str(inspect.signature(fn).return_annotation)
                    assert "Any" not in returns, f"{cls.__name__}.{name} -> {returns}"


def test_restore_mounters_attacher_speaks_nbd_pools_contract() -> None:
    attach = importlib.import_module("restore_mounter.attach")
    assert attach.AttachIn is nbd_pool_contract.AttachIn is nbd_pool.api.AttachIn
    assert attach.AttachmentAnswer is nbd_pool_contract.Attachment is nbd_pool.api.Attachment


@pytest.mark.parametrize("agent", AGENTS)
def test_each_agent_serves_its_openapi_document_on_its_socket(stack_config: Stack, agent: str) -> None:
    stack_config.start(agent)
    status, doc = unix_get(stack_config.run_dir / f"{agent}.sock", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == f"{agent} agent API"
    api = SIDES[agent][1]
    apis = [cls.__new__(cls) for cls in vars(api).values() if isinstance(cls, type)
            and cls.__module__ == api.__name__ and any(hasattr(f, "__oma_routes__") for f in vars(cls).values())]
    routes = {(b.spec.method.lower(), b.spec.path) for b in collect(*apis)}
    served = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert routes <= served and ("get", "/health") in served and ("get", "/openapi.json") in served
    components = doc["components"]["schemas"]
    queries = {name for ops in doc["paths"].values() for op in ops.values() for p in op.get("parameters", [])
               if p["in"] == "query" for name in [p["name"]]}
    for cls in declared(api):
        fields = {f.name for f in dataclasses.fields(cls)}
        if cls.__name__.endswith("Query"):  # a query's fields are the operation's parameters
            assert fields <= queries, cls
            continue
        assert cls.__name__ in components, cls
        assert set(components[cls.__name__]["properties"]) == fields
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["security"] == [] and "403" in op["responses"]  # the socket's peer uid is checked
