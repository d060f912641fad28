"""The kernel's TCP socket table, as the daemons read it: /proc/net/tcp and tcp6 parsed, and the sock_diag
(netlink, sock_diag(7)) framing both omad's exact-match lookup and nbd-pool's filtered dumps use.

Reading /proc/net/tcp walks every socket of the host (tens of milliseconds with a few hundred): callers ask
sock_diag first and read the tables only where netlink is refused (a unit without AF_NETLINK).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Address = tuple[IP, int]
TABLES = ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6"))
ESTABLISHED, LISTEN = 0x01, 0x0A  # TCP states as the tables and sock_diag number them

# sock_diag(7), linux/netlink.h, linux/inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of /proc/net/tcp or tcp6: addresses as the kernel has them (an IPv6 socket's IPv4 peer stays
    IPv4-mapped; see `plain`)."""

    family: int
    local: Address
    remote: Address
    state: int
    uid: int
    inode: int


def address(text: str) -> Address:
    """"0100007F:1F92" → (127.0.0.1, 8082). The address words are printed in host byte order, the port is not."""
    host, port = text.split(":")
    words = [int(host[i:i + 8], 16) for i in range(0, len(host), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    return ipaddress.ip_address(packed), int(port, 16)


def plain(ip: IP) -> IP:
    """An IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def entries(tables: tuple[tuple[int, str], ...] = TABLES) -> Iterator[Entry]:
    """Every TCP socket of this network namespace."""
    for family, table in tables:
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            cols = line.split()
            if len(cols) < 10:
                continue
            yield Entry(family, address(cols[1]), address(cols[2]), int(cols[3], 16), int(cols[7]), int(cols[9]))


def open_netlink() -> socket.socket:
    """A sock_diag socket (raises PermissionError/OSError where the sandbox refuses AF_NETLINK)."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)


def request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: the header, then `body`."""
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, 0) + body


def raise_error(data: bytes, offset: int) -> None:
    """An NLMSG_ERROR message at `offset` as the OSError it carries."""
    (code,) = struct.unpack_from("=i", data, offset + HEADER.size)
    raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
