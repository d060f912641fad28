"""The kernel's TCP socket table: who owns the other end of a local connection.

One connection is looked up with sock_diag (netlink, NETLINK_SOCK_DIAG, an exact-match request: the kernel
finds the one socket, see sock_diag(7)); /proc/net/tcp and tcp6 are read only where netlink is refused and for
listeners. Reading /proc/net/tcp walks every socket of the host: tens of milliseconds with a few hundred.
"""

from __future__ import annotations

import errno
import ipaddress
import os
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
    try:
        return diag_owner_uid(local, remote)
    except PermissionError:  # netlink refused (a sandbox without AF_NETLINK): the slow way
        for here, there, _state, uid in entries(tables):
            if here == local and there == remote:
                return uid
        return None


# sock_diag(7) and linux/inet_diag.h
NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBxI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct(">HH16s16s")  # inet_diag_sockid: sport, dport, src, dst (network order) ...
_SOCKID_TAIL = struct.Struct("=III")  # ... if, cookie[2]
_MSG = struct.Struct("=BBBB48sIIIII")  # inet_diag_msg: family, state, timer, retrans, id, expires, rq, wq, uid, inode


def _packed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return ip.packed.ljust(16, b"\0")


def diag_owner_uid(local: Address, remote: Address) -> int | None:
    """owner_uid through sock_diag: one exact-match request for the socket local → remote."""
    family = socket.AF_INET if local[0].version == 4 else socket.AF_INET6
    if remote[0].version != local[0].version:
        return None
    sockid = _SOCKID.pack(local[1], remote[1], _packed(local[0]), _packed(remote[0])) + \
        _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    seq = 1
    message = _HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(message)
        reply = nl.recv(65536)
    length, kind, _flags, _seq, _pid = _HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _HEADER.size)
        if -code == errno.ENOENT:
            return None
        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    if kind != _SOCK_DIAG_BY_FAMILY or length < _HEADER.size + _MSG.size:
        raise OSError(errno.EPROTO, f"sock_diag: unexpected reply type {kind}")
    msg = _MSG.unpack_from(reply, _HEADER.size)
    # The kernel's exact lookup falls back to a listening socket on the same port when no connection
    # matches (inet_lookup): only the connection itself, both ends as asked, names its owner.
    sport, dport, src, dst = _SOCKID.unpack_from(msg[4])
    if msg[1] == LISTEN or (sport, dport) != (local[1], remote[1]) or \
            (src, dst) != (_packed(local[0]), _packed(remote[0])):
        return None
    return int(msg[8])


LISTEN = 0x0A


def listener_uid(local: Address, tables: tuple[Path, ...] = TABLES) -> int | None:
    """The uid owning the TCP socket listening on `local`, if any."""
    for here, _there, state, uid in entries(tables):
        if state == LISTEN and here == local:
            return uid
    return None
