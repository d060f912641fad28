"""Declared shapes: dataclasses that validate JSON input and describe themselves as JSON Schema.

One declaration serves three purposes: it parses a request body, query string or config file into a typed
object (collecting every problem, not just the first), and it renders the OpenAPI document.
Constraints ride on the dataclass field: ``name: str = spec(min_length=1, max_length=128)``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from .errors import Invalid

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def spec(
    default: Any = _MISSING,
    *,
    factory: Any = _MISSING,
    description: str = "",
    min: float | None = None,
    max: float | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    pattern: str | None = None,
    example: Any = None,
) -> Any:
    """A dataclass field with validation constraints and documentation."""
    meta = {
        k: v
        for k, v in dict(
            description=description, minimum=min, maximum=max, minLength=min_length,
            maxLength=max_length, pattern=pattern, example=example,
        ).items()
        if v not in (None, "")
    }
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where or 'body'}: {what}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce_text(tp: Any, value: str) -> Any:
    """Query strings and path parameters arrive as text; turn them into the declared scalar."""
    _, tp = _is_optional(tp)
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return value
    if tp is int:
        try:
            return int(value)
        except ValueError:
            return value
    if tp is float:
        try:
            return float(value)
        except ValueError:
            return value
    if get_origin(tp) is list:
        return [_coerce_text(get_args(tp)[0], v) for v in value.split(",") if v != ""]
    return value


def _check(tp: Any, value: Any, where: str, meta: dict[str, Any], problems: _Problems) -> Any:
    optional, tp = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        problems.add(where, "must not be null")
        return None
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            problems.add(where, f"must be one of {', '.join(map(str, get_args(tp)))}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            problems.add(where, f"must be one of {', '.join(str(m.value) for m in tp)}")
            return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.add(where, "must be an object")
            return None
        return _build(tp, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.add(where, "must be an array")
            return None
        out = [_check(get_args(tp)[0], v, f"{where}[{i}]", {}, problems) for i, v in enumerate(value)]
        _bounds(len(out), meta.get("minLength"), meta.get("maxLength"), where, "items", problems)
        return out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.add(where, "must be an object")
            return None
        args = get_args(tp)
        if args:
            return {k: _check(args[1], v, f"{where}.{k}", {}, problems) for k, v in value.items()}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.add(where, "must be a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(where, "must be an integer")
            return value
        _range(value, meta, where, problems)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(where, "must be a number")
            return value
        _range(value, meta, where, problems)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.add(where, "must be a string")
            return value
        if "\x00" in value:
            problems.add(where, "must not contain NUL bytes")
        _bounds(len(value), meta.get("minLength"), meta.get("maxLength"), where, "characters", problems)
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            problems.add(where, f"must match {meta['pattern']}")
        return value
    if origin in (Union, types.UnionType):
        for alt in get_args(tp):
            trial = _Problems()
            out = _check(alt, value, where, meta, trial)
            if not trial.items:
                return out
        problems.add(where, f"must be one of {' | '.join(_type_name(a) for a in get_args(tp))}")
        return value
    raise TypeError(f"schema type {tp!r} is not supported")


def _range(value: float, meta: dict[str, Any], where: str, problems: _Problems) -> None:
    if "minimum" in meta and value < meta["minimum"]:
        problems.add(where, f"must be >= {meta['minimum']}")
    if "maximum" in meta and value > meta["maximum"]:
        problems.add(where, f"must be <= {meta['maximum']}")


def _bounds(n: int, lo: int | None, hi: int | None, where: str, unit: str, problems: _Problems) -> None:
    if lo is not None and n < lo:
        problems.add(where, f"must have at least {lo} {unit}")
    if hi is not None and n > hi:
        problems.add(where, f"must have at most {hi} {unit}")


def _build(cls: type[T], data: dict[str, Any], where: str, problems: _Problems) -> T:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            values[f.name] = _check(hints[f.name], data[f.name], path, dict(f.metadata), problems)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            problems.add(path, "is required")
    if problems.items:
        return None  # type: ignore[return-value]
    return cls(**values)


def parse(cls: type[T], data: Any, *, what: str = "body") -> T:
    """Validate `data` against dataclass `cls`; raise Invalid listing every problem."""
    if not isinstance(data, dict):
        raise Invalid(f"invalid {what}", f"the {what} must be a JSON object")
    problems = _Problems()
    out = _build(cls, data, "", problems)
    if problems.items:
        raise Invalid(f"invalid {what}", "; ".join(problems.items), problems=problems.items)
    return out


def parse_text(cls: type[T], data: typing.Mapping[str, str], *, what: str = "query") -> T:
    """Validate text parameters (query strings), converting them to the declared scalar types first."""
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    converted = {k: _coerce_text(hints[k], v) for k, v in data.items() if k in known}
    return parse(cls, converted, what=what)


def to_dict(obj: Any) -> Any:
    """A dataclass instance (possibly nested) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


class SchemaRegistry:
    """Renders dataclasses as JSON Schema, collecting named components for OpenAPI."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def ref(self, cls: type) -> dict[str, Any]:
        name = cls.__name__
        if name not in self.components:
            self.components[name] = {}  # placeholder breaks recursion
            self.components[name] = self._object(cls)
        return {"$ref": f"#/components/schemas/{name}"}

    def _object(self, cls: type) -> dict[str, Any]:
        hints = _hints(cls)
        props: dict[str, Any] = {}
        required: list[str] = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            prop = self.of(hints[f.name])
            prop.update({k: v for k, v in f.metadata.items() if v is not None})
            if f.default is not _MISSING and f.default is not None and not isinstance(f.default, enum.Enum):
                prop["default"] = f.default
            props[f.name] = prop
            if f.default is _MISSING and f.default_factory is _MISSING:
                required.append(f.name)
        out: dict[str, Any] = {"type": "object", "properties": props}
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # not dataclass's made-up signature
            out["description"] = cls.__doc__.strip().splitlines()[0]
        if required:
            out["required"] = required
        return out

    def of(self, tp: Any) -> dict[str, Any]:
        optional, tp = _is_optional(tp)
        out = self._of(tp)
        if optional:
            out = dict(out, nullable=True) if "$ref" not in out else {"allOf": [out], "nullable": True}
        return out

    def _of(self, tp: Any) -> dict[str, Any]:
        if tp is Any:
            return {}
        origin = get_origin(tp)
        if origin is Literal:
            vals = list(get_args(tp))
            return {"type": "string" if isinstance(vals[0], str) else "integer", "enum": vals}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return {"type": "string", "enum": [m.value for m in tp]}
        if dataclasses.is_dataclass(tp):
            return self.ref(tp)  # type: ignore[arg-type]
        if origin is list:
            return {"type": "array", "items": self.of(get_args(tp)[0])}
        if origin is dict or tp is dict:
            args = get_args(tp)
            return {"type": "object", "additionalProperties": self.of(args[1]) if args else {}}
        if origin in (Union, types.UnionType):
            return {"oneOf": [self.of(a) for a in get_args(tp)]}
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        raise TypeError(f"schema type {tp!r} is not supported")
