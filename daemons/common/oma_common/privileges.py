"""What a daemon's adapters need from the system, declared beside them and checked against its unit.

Each daemon's `adapters` package declares `NEEDS`: one entry per adapter module (and per other module that
needs something, e.g. file access inside restore mounts), saying which capabilities, which system-call
groups beyond `@system-service`, and which devices it uses, each with its reason. tests/packaging checks
that every unit grants exactly the union — so an adapter that starts to need more fails a test, not the
appliance.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Needs:
    why: str
    capabilities: frozenset[str] = frozenset()
    syscalls: frozenset[str] = frozenset()  # groups beyond @system-service, e.g. "@mount"
    devices: frozenset[str] = frozenset()   # device nodes opened (documentation; no unit uses DevicePolicy=)


def needs(why: str, *, caps: tuple[str, ...] = (), syscalls: tuple[str, ...] = (),
          devices: tuple[str, ...] = ()) -> Needs:
    return Needs(why, frozenset(caps), frozenset(syscalls), frozenset(devices))


def union(table: dict[str, Needs]) -> Needs:
    return Needs("union", frozenset().union(*(n.capabilities for n in table.values())),
                 frozenset().union(*(n.syscalls for n in table.values())),
                 frozenset().union(*(n.devices for n in table.values())))
