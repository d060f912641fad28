"""Configuration: typed defaults in code, TOML drop-ins read in name order, and --show-config."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from . import schema
from .errors import Invalid

T = TypeVar("T")

SYSTEM_DIRS = (Path("/usr/lib/oma"), Path("/etc/oma"))


def default_dirs(daemon: str) -> list[Path]:
    """The packaged defaults first, then the operator's overrides."""
    return [base / f"{daemon}.d" for base in SYSTEM_DIRS]


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def read_dropins(dirs: list[Path]) -> tuple[dict[str, Any], list[Path]]:
    """Merge every `*.toml` of each directory, directories in order, files in name order."""
    merged: dict[str, Any] = {}
    used: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.toml")):
            try:
                data = tomllib.loads(f.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise Invalid(f"cannot read config file {f}", str(e)) from e
            _merge(merged, data)
            used.append(f)
    return merged, used


def load(cls: type[T], dirs: list[Path]) -> T:
    """Build the config dataclass `cls` from its defaults and the drop-ins in `dirs`."""
    data, used = read_dropins(dirs)
    try:
        return schema.parse(cls, data, what="configuration")
    except Invalid as e:
        raise Invalid(e.message, f"{e.details} (files: {', '.join(map(str, used)) or 'none'})") from e


def arg_parser(daemon: str, description: str) -> argparse.ArgumentParser:
    """The options every daemon takes."""
    p = argparse.ArgumentParser(prog=daemon, description=description)
    p.add_argument("--config", action="append", type=Path, metavar="DIR",
                   help=f"read *.toml drop-ins from DIR instead of "
                        f"{' and '.join(map(str, default_dirs(daemon)))} (repeatable, read in order)")
    p.add_argument("--show-config", action="store_true", help="print the effective configuration as JSON and exit")
    p.add_argument("--log-level", default=None, help="override the configured log level")
    return p


def load_from_args(cls: type[T], daemon: str, args: argparse.Namespace) -> T:
    return load(cls, args.config or default_dirs(daemon))


SECRET_KEYS = ("secret_key", "secret", "password", "token")


def _masked(data: Any) -> Any:
    """Secrets in the configuration (a CloudStack secret key) are shown as set or not, never in clear."""
    if isinstance(data, dict):
        return {k: ("(set)" if v else "") if isinstance(v, str) and k.lower().endswith(SECRET_KEYS)
                else _masked(v) for k, v in data.items()}
    return data


def dump(cfg: Any) -> str:
    return json.dumps(_masked(schema.to_dict(cfg)), indent=2, default=str)
