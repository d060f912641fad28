"""Declared schemas: validation collects every problem; query text is converted; OpenAPI renders."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from oma_common.errors import Invalid
from oma_common.schema import (INT64_MAX, SchemaRegistry, any_case, ecma_pattern, name_spec, parse, parse_text,
                               spec, text_spec)


@dataclasses.dataclass
class Disk:
    index: int = spec(min=0, max=15)
    label: str = spec("", max_length=8)


@dataclasses.dataclass
class Thing:
    name: str = spec(min_length=1, max_length=10)
    kind: Literal["full", "incremental"] = "full"
    count: int = spec(1, min=1, max=5)
    ratio: float = 0.5
    enabled: bool = True
    tags: list[str] = spec(factory=list)
    disks: list[Disk] = spec(factory=list)
    note: str | None = None


def test_valid_input_builds_typed_object() -> None:
    t = parse(Thing, {"name": "a", "kind": "incremental", "count": 3, "ratio": 1, "disks": [{"index": 2}],
                      "unknown": "ignored"})
    assert t.kind == "incremental" and t.count == 3 and t.ratio == 1.0 and t.disks == [Disk(2)]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(Invalid) as e:
        parse(Thing, {"kind": "weekly", "count": "3", "enabled": 1, "tags": "x", "disks": [{"index": 99}],
                      "note": 5})
    details = e.value.details
    for fragment in ("name: is required", "kind: must be one of full, incremental", "count: must be an integer",
                     "enabled: must be a boolean", "tags: must be an array", "disks[0].index: must be <= 15",
                     "note: must be a string"):
        assert fragment in details


def test_bool_is_not_an_integer_and_nul_is_refused() -> None:
    with pytest.raises(Invalid, match="count: must be an integer"):
        parse(Thing, {"name": "a", "count": True})
    with pytest.raises(Invalid, match="NUL"):
        parse(Thing, {"name": "a\x00b"})


def test_body_must_be_an_object() -> None:
    with pytest.raises(Invalid, match="must be a JSON object"):
        parse(Thing, ["name"])


def test_query_text_is_converted_to_declared_types() -> None:
    t = parse_text(Thing, {"name": "a", "count": "2", "enabled": "false", "ratio": "0.25", "tags": "x,y"})
    assert (t.count, t.enabled, t.ratio, t.tags) == (2, False, 0.25, ["x", "y"])
    with pytest.raises(Invalid, match="count: must be an integer"):
        parse_text(Thing, {"name": "a", "count": "two"})


def test_json_schema_carries_constraints_and_required() -> None:
    reg = SchemaRegistry()
    reg.ref(Thing)
    thing = reg.components["Thing"]
    assert thing["required"] == ["name"]
    assert thing["properties"]["count"] == {"type": "integer", "minimum": 1, "maximum": 5, "default": 1}
    assert thing["properties"]["kind"]["enum"] == ["full", "incremental"]
    assert thing["properties"]["disks"]["items"] == {"$ref": "#/components/schemas/Disk"}
    assert thing["properties"]["note"]["nullable"] is True
    # OpenAPI 3.0: an enum restricts a nullable value too, so a nullable choice lists null among its values.
    assert reg.of(Literal["a", "b"] | None) == {"type": "string", "enum": ["a", "b", None], "nullable": True}


@dataclasses.dataclass
class Named:
    name: str = name_spec(max_length=20)
    description: str = text_spec("", max_length=100)
    size: int = 0
    kind: str = spec("nfs", pattern=any_case("nfs", "cifs"))


@pytest.mark.parametrize("bad", ["esc\x1b[2J", "cr\rhidden", "nul\x00", "lone \ud800 surrogate", "c1 \x9b",
                                 "bidi \u202e", "line\nbreak", "x" * 21])
def test_names_refuse_control_characters_invalid_unicode_and_length(bad: str) -> None:
    with pytest.raises(Invalid, match="name: must"):
        parse(Named, {"name": bad})


def test_text_allows_tab_and_newline_only() -> None:
    assert parse(Named, {"name": "web 01 – ünï/cödé", "description": "two\nlines\tand a tab"}).description
    for bad in ("esc\x1b", "cr\r", "\udfff"):
        with pytest.raises(Invalid, match="description: must"):
            parse(Named, {"name": "n", "description": bad})


def test_integers_are_bounded_to_64_bits_even_undeclared() -> None:
    assert parse(Named, {"name": "n", "size": INT64_MAX}).size == INT64_MAX
    with pytest.raises(Invalid, match="size: must be <="):
        parse(Named, {"name": "n", "size": INT64_MAX + 1})
    with pytest.raises(Invalid, match="size: must be an integer"):
        parse_text(Named, {"name": "n", "size": "9" * 400})
    reg = SchemaRegistry()
    reg.ref(Named)
    assert reg.components["Named"]["properties"]["size"]["maximum"] == INT64_MAX


def test_query_text_takes_only_what_openapi_serialises() -> None:
    for bad in ("1_000", " 7", "\u0661", "+3"):
        with pytest.raises(Invalid, match="count: must be an integer"):
            parse_text(Thing, {"name": "a", "count": bad})
    with pytest.raises(Invalid, match="enabled: must be a boolean"):
        parse_text(Thing, {"name": "a", "enabled": "yes"})


def test_patterns_are_ecma_262_and_anchored_in_the_document() -> None:
    with pytest.raises(ValueError, match="not ECMA-262"):
        ecma_pattern("(?i)local|nfs")
    with pytest.raises(ValueError, match="not ECMA-262"):
        spec(pattern=r"\Aabc\Z")
    assert parse(Named, {"name": "n", "kind": "NFS"}).kind == "NFS"
    with pytest.raises(Invalid, match="kind: must match"):
        parse(Named, {"name": "n", "kind": "nfsx"})
    reg = SchemaRegistry()
    reg.ref(Named)
    props = reg.components["Named"]["properties"]
    assert props["kind"]["pattern"] == "^(?:[Nn][Ff][Ss]|[Cc][Ii][Ff][Ss])$"
    assert props["name"]["pattern"].startswith("^[^") and props["name"]["maxLength"] == 20
    reg.ref(Thing)
    assert reg.components["Thing"]["properties"]["tags"].get("maxItems") is None  # lists count items
