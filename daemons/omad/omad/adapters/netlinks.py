"""This machine's network interfaces and their MAC addresses, read over netlink with pyroute2."""

from __future__ import annotations

import asyncio
import dataclasses

_NO_MAC = "00:00:00:00:00:00"


@dataclasses.dataclass(frozen=True)
class LocalNic:
    name: str
    mac_address: str  # lower case, colon separated


def _read() -> list[LocalNic]:
    from pyroute2 import IPRoute  # on first use: importing pyroute2 costs every omad start ~0.2 s of CPU

    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            mac = (link.get_attr("IFLA_ADDRESS") or "").lower()
            name = link.get_attr("IFLA_IFNAME") or ""
            # Loopback has no hardware address; tunnels and the like carry no 6-byte MAC.
            if len(mac) == 17 and mac != _NO_MAC:
                out.append(LocalNic(name, mac))
    return out


async def local_nics() -> list[LocalNic]:
    """Every interface of this network namespace with an Ethernet address (netlink is quick but blocking)."""
    return await asyncio.get_running_loop().run_in_executor(None, _read)
