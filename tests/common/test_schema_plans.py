"""What parse compiles once per declared class (its plan) must not change what it answers: classes of the same
name, optional and union fields, nested and self-referencing classes, forward references resolved late."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import types
from typing import Optional

import pytest

from oma_common.errors import Invalid
from oma_common.schema import parse, parse_text, spec


def module(name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module of its own (annotations are strings: they resolve in its namespace, as in a real module)."""
    mod = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, mod)
    exec(compile("from __future__ import annotations\nimport dataclasses\nfrom oma_common.schema import spec\n"
                 + textwrap.dedent(source), name, "exec"), mod.__dict__)
    return mod


def problems(cls: type, data: object) -> list[str]:
    with pytest.raises(Invalid) as e:
        parse(cls, data)
    return list(e.value.extra["problems"])


def test_two_classes_of_one_name_in_two_modules_keep_their_own_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    a = module("plans_a", """
        class Limit:
            pass
        @dataclasses.dataclass
        class Item:
            size: int = spec(max=10)
            limit: Limit | None = None
        """, monkeypatch)
    b = module("plans_b", """
        @dataclasses.dataclass
        class Limit:
            n: int
        @dataclasses.dataclass
        class Item:
            size: str = spec(max_length=3)
            limit: Limit | None = None
        """, monkeypatch)
    assert a.Item.__qualname__ == b.Item.__qualname__
    for _ in range(2):  # in either order, again: neither plan is the other's
        assert parse(a.Item, {"size": 10}).size == 10
        assert problems(a.Item, {"size": "x"}) == ["size: must be an integer"]
        assert parse(b.Item, {"size": "abc", "limit": {"n": 1}}).limit == b.Limit(1)
        assert problems(b.Item, {"size": 10, "limit": {}}) == ["size: must be a string", "limit.n: is required"]
    with pytest.raises(TypeError, match="not supported"):  # plans_a's Limit is no dataclass: found when used
        parse(a.Item, {"size": 1, "limit": {}})
    assert parse(a.Item, {"size": 1, "limit": None}).limit is None


@dataclasses.dataclass
class Mixed:
    required_nullable: str | None = spec(max_length=2)
    either: int | str = 0
    maybe: int | None = spec(None, min=1)
    maybe_either: Optional[int | str] = None  # noqa: UP007 (the spelling that typing.get_type_hints flattens)
    maybe_list: list[int] | None = None


def test_optional_and_union_fields_answer_the_same_every_time() -> None:
    for _ in range(2):
        m = parse(Mixed, {"either": "x", "maybe": 3, "maybe_either": 4, "maybe_list": [1],
                          "required_nullable": None})
        assert (m.either, m.maybe, m.maybe_either, m.maybe_list, m.required_nullable) == ("x", 3, 4, [1], None)
        assert parse(Mixed, {"either": 5, "maybe_either": "y", "required_nullable": "ab"}).maybe_either == "y"
        assert problems(Mixed, {"either": 1.5, "maybe": 0, "maybe_either": [], "maybe_list": ["a"],
                                "required_nullable": "abc"}) == [
            "required_nullable: must have at most 2 characters", "either: must be one of int | str",
            "maybe: must be >= 1", "maybe_either: must be one of int | str", "maybe_list[0]: must be an integer"]
        assert problems(Mixed, {"either": None}) == ["required_nullable: is required", "either: must not be null"]
    assert parse_text(Mixed, {"maybe": "7", "maybe_list": "1,2", "required_nullable": "a"}).maybe_list == [1, 2]


@dataclasses.dataclass
class Tree:
    """Names a class defined below it, and itself."""

    name: str = spec(min_length=1)
    leaf: Leaf | None = None
    children: list[Tree] = spec(factory=list)


@dataclasses.dataclass
class Leaf:
    weight: int = spec(min=0)


def test_nested_and_self_referencing_classes() -> None:
    data = {"name": "root", "leaf": {"weight": 1},
            "children": [{"name": "a", "children": [{"name": "b", "leaf": {"weight": 2}}]}]}
    for _ in range(2):
        t = parse(Tree, data)
        assert t.children[0].children[0] == Tree("b", Leaf(2)) and t.leaf == Leaf(1)
        assert problems(Tree, {"name": "", "children": [{"children": [{"name": "c", "leaf": {"weight": -1}}]}]}) == [
            "name: must have at least 1 characters", "children[0].name: is required",
            "children[0].children[0].leaf.weight: must be >= 0"]
        assert problems(Tree, {"name": "x", "leaf": 3, "children": {}}) == ["leaf: must be an object",
                                                                            "children: must be an array"]
    assert parse(Leaf, {"weight": 0}) == Leaf(0)  # the nested class also parses on its own


def test_a_forward_reference_that_does_not_resolve_yet_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = module("plans_late", """
        @dataclasses.dataclass
        class Outer:
            inner: Later
        """, monkeypatch)
    with pytest.raises(NameError):
        parse(mod.Outer, {"inner": {}})
    exec(compile("@dataclasses.dataclass\nclass Later:\n    n: int = 1\n", "plans_late", "exec"), mod.__dict__)
    assert parse(mod.Outer, {"inner": {}}).inner == mod.Later(1)
    assert problems(mod.Outer, {"inner": {"n": "x"}}) == ["inner.n: must be an integer"]
