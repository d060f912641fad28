"""Declared shapes: dataclasses that validate JSON input and describe themselves as JSON Schema.

One declaration serves three purposes: it parses a request body, query string or config file into a typed
object (collecting every problem, not just the first), and it renders the OpenAPI document.
Constraints ride on the dataclass field: ``name: str = spec(min_length=1, max_length=128)``.

Strings: every string must be valid Unicode (no lone surrogates) without NUL. Names (``name_spec(...)``: no
control characters at all) and free text (``text_spec(...)``: tab and newline allowed) say so in the document
with an ECMA-262 pattern, and are checked here. Patterns are ECMA-262 and Python alike (no inline flags,
no ``\\A``/``\\Z``) and match the whole value; the document anchors them. Integers without declared bounds
are bounded to SQLite's 64-bit range in both the check and the document.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from .errors import Invalid

T = TypeVar("T")
_MISSING = dataclasses.MISSING

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
# C0 controls, DEL, C1 controls, the line/paragraph separators and the bidirectional overrides and
# isolates (they reorder what a terminal or a table shows).
NAME_PATTERN = r"^[^\u0000-\u001F\u007F-\u009F\u2028-\u202E\u2066-\u2069]*$"
# The same, but tab and newline are allowed (descriptions, notes).
TEXT_PATTERN = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F\u2028-\u202E\u2066-\u2069]*$"
# Inline flags, named groups, atomic groups, \A \Z: Python only (ECMA-262 has lookarounds and (?:...)).
_NOT_ECMA = re.compile(r"\(\?(?![:=!]|<[=!])|\\[AZ]")


def ecma_pattern(pattern: str) -> str:
    """`pattern` itself when JSON Schema's regex dialect (ECMA-262) reads it as Python does; else ValueError."""
    if _NOT_ECMA.search(pattern):
        raise ValueError(f"pattern {pattern!r} is not ECMA-262 (no inline flags, named groups, \\A or \\Z); "
                         "use an enum or character classes such as [Ll]ocal")
    re.compile(pattern)
    return pattern


def any_case(*words: str) -> str:
    """An ECMA-262 pattern that matches any of `words` in any letter case (`[Nn][Ff][Ss]`)."""
    def one(w: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in w)
    return "^(?:" + "|".join(one(w) for w in words) + ")$"


_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)  # re's own cache is looked up by (type, pattern, flags) on every call: slower


def text_problems(value: str, *, max_length: int | None = None, pattern: str | None = None) -> list[str]:
    """What is wrong with a string: NUL, invalid Unicode, length, pattern (one line each)."""
    out = []
    if "\x00" in value:
        out.append("must not contain NUL characters")
    if _SURROGATE.search(value):
        out.append("must be valid Unicode (it holds a lone UTF-16 surrogate)")
    if max_length is not None and len(value) > max_length:
        out.append(f"must have at most {max_length} characters")
    if pattern is not None and not _compiled(pattern).fullmatch(value):
        if pattern in (NAME_PATTERN, TEXT_PATTERN):
            out.append("must not contain control characters" + (" (tab and newline are allowed)"
                                                                 if pattern == TEXT_PATTERN else ""))
        else:
            out.append(f"must match {pattern}")
    return out


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
    item: dict[str, Any] | None = None,
) -> Any:
    """A dataclass field with validation constraints and documentation; `item` constrains each item of a list
    (JSON Schema keywords, e.g. from `name_item(255)`)."""
    if pattern is not None:
        ecma_pattern(pattern)
    meta = {
        k: v
        for k, v in dict(
            description=description, minimum=min, maximum=max, minLength=min_length,
            maxLength=max_length, pattern=pattern, example=example, item=item,
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


def name_spec(default: Any = _MISSING, *, max_length: int, min_length: int | None = None, description: str = "",
         example: Any = None) -> Any:
    """A name or identifier: bounded, no control characters, valid Unicode."""
    return spec(default, min_length=min_length, max_length=max_length, pattern=NAME_PATTERN,
                description=description, example=example)


def text_spec(default: Any = _MISSING, *, max_length: int, min_length: int | None = None, description: str = "",
         example: Any = None) -> Any:
    """Free text (a description, a note): bounded, tab and newline but no other control characters."""
    return spec(default, min_length=min_length, max_length=max_length, pattern=TEXT_PATTERN,
                description=description, example=example)


def name_item(max_length: int) -> dict[str, Any]:
    """`item=` for a list of names: each bounded, without control characters."""
    return {"maxLength": max_length, "pattern": NAME_PATTERN}


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a declared class, read-only (typing.get_type_hints evaluates every string
    annotation again on each call: 0.2 ms a class, twice per request with a query or a body)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_INT_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _coerce_text(tp: Any, value: str) -> Any:
    """Query strings and path parameters arrive as text; turn them into the declared scalar."""
    _, tp = _is_optional(tp)
    # As OpenAPI serialises them, nothing else: int() would also take "1_000", " 7" and other scripts' digits.
    if tp is bool:
        return {"true": True, "false": False}.get(value, value)
    if tp is int:
        return int(value) if _INT_TEXT.fullmatch(value) and len(value) <= 20 else value
    if tp is float:
        return float(value) if _FLOAT_TEXT.fullmatch(value) and len(value) <= 64 else value
    if get_origin(tp) is list:
        return [_coerce_text(get_args(tp)[0], v) for v in value.split(",") if v != ""]
    return value


# A field's check, compiled once per class from its type and constraints (`_plan`): the type is taken apart
# (optional, origin, arguments, messages) when the class is first parsed, not on every value. Called as
# check(value, where, problems); it returns the value as parsed and adds what is wrong to `problems`.
Check = Callable[[Any, str, _Problems], Any]


def _compile(tp: Any, meta: dict[str, Any]) -> Check:
    optional, tp = _is_optional(tp)
    nullable = optional or tp is Any
    inner = _compile_value(tp, meta)

    def check(value: Any, where: str, problems: _Problems) -> Any:
        if value is None:
            if not nullable:
                problems.add(where, "must not be null")
            return None
        return inner(value, where, problems)

    return check


def _compile_value(tp: Any, meta: dict[str, Any]) -> Check:
    """The check of a value that is not None."""
    if tp is Any:
        return lambda value, where, problems: value
    origin = get_origin(tp)
    if origin is Literal:
        return _literal(get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if dataclasses.is_dataclass(tp):
        return _nested(tp)  # type: ignore[arg-type]
    if origin is list:
        return _list(_compile(get_args(tp)[0], meta.get("item", {})), meta.get("minLength"), meta.get("maxLength"))
    if origin is dict or tp is dict:
        args = get_args(tp)
        return _dict(_compile(args[1], {}) if args else None)
    if tp is bool:
        return _boolean
    if tp is int:
        return _integer({"minimum": INT64_MIN, "maximum": INT64_MAX, **meta})
    if tp is float:
        return _number(meta)
    if tp is str:
        return _string(meta)
    if origin in (Union, types.UnionType):
        return _union(tuple(_compile(alt, meta) for alt in get_args(tp)),
                      f"must be one of {' | '.join(_type_name(a) for a in get_args(tp))}")
    return _unsupported(tp)


def _literal(allowed: tuple[Any, ...]) -> Check:
    message = f"must be one of {', '.join(map(str, allowed))}"

    def check(value: Any, where: str, problems: _Problems) -> Any:
        if value not in allowed:
            problems.add(where, message)
        return value

    return check


def _enum(tp: type[enum.Enum]) -> Check:
    message = f"must be one of {', '.join(str(m.value) for m in tp)}"

    def check(value: Any, where: str, problems: _Problems) -> Any:
        try:
            return tp(value)
        except ValueError:
            problems.add(where, message)
            return None

    return check


def _nested(tp: type) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        if not isinstance(value, dict):
            problems.add(where, "must be an object")
            return None
        return _build(tp, value, where, problems)  # its plan is looked up then: a class may contain itself

    return check


def _list(item: Check, lo: int | None, hi: int | None) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        if not isinstance(value, list):
            problems.add(where, "must be an array")
            return None
        out = [item(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        _bounds(len(out), lo, hi, where, "items", problems)
        return out

    return check


def _dict(item: Check | None) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        if not isinstance(value, dict):
            problems.add(where, "must be an object")
            return None
        if item is not None:
            return {k: item(v, f"{where}.{k}", problems) for k, v in value.items()}
        return value

    return check


def _boolean(value: Any, where: str, problems: _Problems) -> Any:
    if not isinstance(value, bool):
        problems.add(where, "must be a boolean")
    return value


def _integer(meta: dict[str, Any]) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(where, "must be an integer")
            return value
        _range(value, meta, where, problems)
        return value

    return check


def _number(meta: dict[str, Any]) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(where, "must be a number")
            return value
        _range(value, meta, where, problems)
        return float(value)

    return check


def _string(meta: dict[str, Any]) -> Check:
    lo, hi, pattern = meta.get("minLength"), meta.get("maxLength"), meta.get("pattern")

    def check(value: Any, where: str, problems: _Problems) -> Any:
        if not isinstance(value, str):
            problems.add(where, "must be a string")
            return value
        _bounds(len(value), lo, None, where, "characters", problems)
        for what in text_problems(value, max_length=hi, pattern=pattern):
            problems.add(where, what)
        return value

    return check


def _union(alternatives: tuple[Check, ...], message: str) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        for alt in alternatives:
            trial = _Problems()
            out = alt(value, where, trial)
            if not trial.items:
                return out
        problems.add(where, message)
        return value

    return check


def _unsupported(tp: Any) -> Check:
    def check(value: Any, where: str, problems: _Problems) -> Any:
        raise TypeError(f"schema type {tp!r} is not supported")  # when a value comes, as it always was

    return check


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


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    dotted: str  # ".name": the field's path below its parent's
    check: Check
    required: bool


_PLANS: dict[type, tuple[_Field, ...]] = {}


def _plan(cls: type) -> tuple[_Field, ...]:
    """A declared class's fields with their compiled checks, made on its first parse (so forward references
    resolve as late as they always did) and kept per class object: two classes of one name are two plans."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = _hints(cls)
        plan = _PLANS[cls] = tuple(
            _Field(f.name, f".{f.name}", _compile(hints[f.name], dict(f.metadata)),
                   f.default is _MISSING and f.default_factory is _MISSING)
            for f in dataclasses.fields(cls))
    return plan


def _build(cls: type[T], data: dict[str, Any], where: str, problems: _Problems) -> T:
    values: dict[str, Any] = {}
    for f in _plan(cls):
        path = where + f.dotted if where else f.name
        if f.name in data:
            values[f.name] = f.check(data[f.name], path, problems)
        elif f.required:
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
    types_ = _text_types(cls)
    converted = {k: _coerce_text(types_[k], v) for k, v in data.items() if k in types_}
    return parse(cls, converted, what=what)


_TEXT_TYPES: dict[type, dict[str, Any]] = {}


def _text_types(cls: type) -> dict[str, Any]:
    """Each field's declared type without its Optional, once per class (query strings parse on every request)."""
    out = _TEXT_TYPES.get(cls)
    if out is None:
        hints = _hints(cls)
        out = _TEXT_TYPES[cls] = {f.name: _is_optional(hints[f.name])[1]
                                  for f in dataclasses.fields(cls)}
    return out


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


_KEYWORDS = {"string": ("minLength", "maxLength", "pattern"), "integer": ("minimum", "maximum"),
             "number": ("minimum", "maximum")}


def anchored(pattern: str) -> str:
    """JSON Schema's `pattern` matches anywhere in the value; ours match the whole of it."""
    if pattern.startswith("^") and pattern.endswith("$"):
        return pattern
    return f"^(?:{pattern})$"


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
        for f in dataclasses.fields(cls):
            prop = self.of(hints[f.name])
            meta = {k: v for k, v in f.metadata.items() if v is not None}
            if "pattern" in meta:
                meta["pattern"] = anchored(meta["pattern"])
            item = meta.pop("item", None)
            if prop.get("type") == "array":  # lengths of a list are counts of items
                meta.update({new: meta.pop(old) for old, new in (("minLength", "minItems"), ("maxLength", "maxItems"))
                             if old in meta})
                if item:
                    prop["items"] = {**prop["items"], **item, "pattern": anchored(item["pattern"])} \
                        if "pattern" in item else {**prop["items"], **item}
            if "oneOf" in prop:  # each constraint goes to the alternatives it is about
                for alt in prop["oneOf"]:
                    alt.update({k: v for k, v in meta.items() if k in _KEYWORDS.get(alt.get("type", ""), ())})
                meta = {k: v for k, v in meta.items() if not any(k in kw for kw in _KEYWORDS.values())}
            prop.update(meta)
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
            if "enum" in out:  # OpenAPI 3.0: an enum restricts a nullable value too, so null must be listed
                out["enum"] = [*out["enum"], None]
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
        if tp is int:
            return {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
        simple = {bool: "boolean", float: "number", str: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        raise TypeError(f"schema type {tp!r} is not supported")
