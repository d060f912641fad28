"""`POST /ossea/config`'s one-call envelope (the GUI's contract): get, create, update, delete or test a config."""

from __future__ import annotations

from typing import Any, Literal

from oma_common.errors import Invalid
from oma_common.web import now_rfc3339

from .config import Configs, Connection
from .settings import Settings

Action = Literal["get", "create", "update", "delete", "test"]


class ConfigEnvelope:
    def __init__(self, configs: Configs, settings: Settings) -> None:
        self.configs = configs
        self.settings = settings

    async def run(self, action: Action, config_id: int | None, fields: dict[str, str], *, make_default: bool,
                  actor: str) -> dict[str, Any]:
        """The envelope's answer: `config`/`configs` or `test_result`, with a message; the secret never."""
        out: dict[str, Any] = {"action": action, "success": True, "timestamp": now_rfc3339()}
        if action == "get":
            configs = await self.configs.list()
            if config_id is not None:
                out["config"] = await self.configs.get(config_id)
            else:  # without an id: the default one
                default = await self.configs.default()
                out["config"] = next((c for c in configs if default and c["id"] == default.id), None)
            out.update(configs=configs, message=f"{len(configs)} CloudStack config(s)")
        elif action == "create":
            out["config"] = await self.configs.create(fields, make_default=make_default, actor=actor)
            out["message"] = f"CloudStack config {out['config']['name']!r} created"
        elif action == "update":
            out["config"] = await self.configs.update(_need(config_id, action), fields, make_default=make_default,
                                                      actor=actor)
            out["message"] = f"CloudStack config {out['config']['name']!r} updated"
        elif action == "delete":
            await self.configs.delete(_need(config_id, action), actor=actor)
            out["message"] = f"CloudStack config {config_id} deleted"
        else:  # test: unsaved credentials in the fields, else the saved config (by id, else the default)
            conn = Connection(api_url=fields.get("api_url"), api_key=fields.get("api_key"),
                              secret_key=fields.get("secret_key") or None, config_id=config_id)
            result = await self.settings.test_connection(conn)
            out.update(test_result=result, success=result["success"], message=result["message"])
        return out


def _need(config_id: int | None, action: str) -> int:
    if config_id is None:
        raise Invalid("config id missing", f"action {action!r} needs the config's id")
    return config_id
