"""The kernel's TCP socket table (/proc/net/tcp, /proc/net/tcp6): who owns the other end of a local connection."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _address(text: str) -> Address:
    """"0100007F:1F92" → (127.0.0.1, 8082). The address words are printed in host byte order, the port is not."""
    host, port = text.split(":")
    words = [int(host[i:i + 8], 16) for i in range(0, len(host), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    ip = ipaddress.ip_address(socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed))
    return _plain(ip), int(port, 16)


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalise(host: str, port: int) -> Address:
    return _plain(ipaddress.ip_address(host.split("%", 1)[0])), port


def entries(tables: tuple[Path, ...] = TABLES) -> Iterator[tuple[Address, Address, int, int]]:
    """(local, remote, state, uid) of every TCP socket of this network namespace."""
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for line in lines:
            f = line.split()
            if len(f) < 8:
                continue
            yield _address(f[1]), _address(f[2]), int(f[3], 16), int(f[7])


def owner_uid(local: Address, remote: Address, tables: tuple[Path, ...] = TABLES) -> int | None:
    """The uid owning the socket whose own end is `local` and whose peer is `remote`: for a loopback connection
    accepted by this process, pass the peer's address as `local` and ours as `remote`. None when not found
    (the connection is gone, or it is not on this host)."""
    for here, there, _state, uid in entries(tables):
        if here == local and there == remote:
            return uid
    return None


LISTEN = 0x0A


def listener_uid(local: Address, tables: tuple[Path, ...] = TABLES) -> int | None:
    """The uid owning the TCP socket listening on `local`, if any."""
    for here, _there, state, uid in entries(tables):
        if state == LISTEN and here == local:
            return uid
    return None
