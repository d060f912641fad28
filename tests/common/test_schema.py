"""Declared schemas: validation collects every problem; query text is converted; OpenAPI renders."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from oma_common.errors import Invalid
from oma_common.schema import SchemaRegistry, parse, parse_text, spec


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
