"""The role matrix: what an operator may do is what the routes declare, and the README says exactly that."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from .test_guard import MACHINE, PUBLIC, App, app, concrete, routes_of  # noqa: F401 - the fixture

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_operator_changes() -> set[tuple[str, str]]:
    text = README.read_text()
    block = text[text.index("<!-- operator-may:begin -->"):text.index("<!-- operator-may:end -->")]
    return {(m.group(1), "/api/v1" + m.group(2)) for m in re.finditer(r"- `(POST|PUT|DELETE|PATCH) (\S+)`", block)}


def plain(path: str) -> str:
    """/backups/{backup_id:(?!chain$)[^/]+} → /backups/{backup_id}"""
    return re.sub(r"\{([a-z_]+):[^}]*\}", r"{\1}", path)


async def test_an_operator_walking_the_router_meets_the_readme_matrix(app: App) -> None:
    await app.auth.add_user("olga", "operator-pass-1", "operator")
    session = (await app.auth.login_password("olga", "operator-pass-1", "127.0.0.2")).session_token
    declared_admin = {(r.method, r.resource.canonical) for r in app.server.app.router.routes()
                      if getattr(r.handler, "__oma_spec__", None) and r.handler.__oma_spec__.auth.value == "admin"}
    allowed_changes = set()
    async with aiohttp.ClientSession() as s:
        for method, path in routes_of(app.server.app):
            if (method, path) in PUBLIC or (method, path) in MACHINE:
                continue
            if path == "/api/v1/auth/logout":  # would end the walker's session: declared, not called
                assert (method, path) not in declared_admin
                allowed_changes.add((method, path))
                continue
            url = str(app.server.make_url(concrete(path)))
            async with s.request(method, url, headers={"Authorization": "Bearer " + session}, json={},
                                 allow_redirects=False) as r:
                if (method, path) in declared_admin:
                    assert r.status == 403, (method, path, r.status)
                    assert (await r.json())["code"] == "forbidden"
                else:
                    assert r.status not in (401, 403), (method, path, r.status)
                    if method != "GET":
                        allowed_changes.add((method, plain(path)))
    assert allowed_changes == readme_operator_changes(), (
        "README's operator list and the routes differ: "
        f"only in routes {sorted(allowed_changes - readme_operator_changes())}, "
        f"only in README {sorted(readme_operator_changes() - allowed_changes)}")
    # The two findings of the review: deleting a backup and creating a policy are for administrators.
    assert ("DELETE", "/api/v1/backups/{backup_id}") not in allowed_changes
    assert ("POST", "/api/v1/policies") not in allowed_changes
