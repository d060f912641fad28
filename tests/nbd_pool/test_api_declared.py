"""Every nbd-pool route that waits for start-up reconciliation (`gated`) may answer 503 while it runs, and
POST /exports answers 503 when it cannot bind its listener: the routes must declare it (OpenAPI, clients)."""

from __future__ import annotations

from nbd_pool import api
from oma_common.web import declared_statuses


def test_gated_routes_declare_503() -> None:
    gated = []
    for cls in (api.PortsApi, api.ExportsApi, api.RootsApi, api.AttachmentsApi):
        for fn in vars(cls).values():
            for spec in getattr(fn, "__oma_routes__", ()):
                if hasattr(fn, "__wrapped__"):  # functools.wraps in api.gated
                    gated.append(f"{spec.method} {spec.path}")
                    assert 503 in declared_statuses(spec), f"{spec.method} {spec.path} does not declare 503"
    assert "POST /exports" in gated and "GET /attachments" in gated
