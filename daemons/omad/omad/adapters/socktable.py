"""The kernel's TCP socket table: who owns the other end of a local connection.

One connection is looked up with sock_diag (netlink, NETLINK_SOCK_DIAG, an exact-match request: the kernel
finds the one socket, see sock_diag(7)); /proc/net/tcp and tcp6 are read only where netlink is refused and for
listeners. Reading /proc/net/tcp walks every socket of the host: tens of milliseconds with a few hundred.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator

from oma_common import tcptable
from oma_common.tcptable import HEADER as _HEADER
from oma_common.tcptable import LISTEN, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY, Address, plain

TABLES = tcptable.TABLES


def normalise(host: str, port: int) -> Address:
    return plain(ipaddress.ip_address(host.split("%", 1)[0])), port


def entries(tables: tuple[tuple[int, str], ...] = TABLES) -> Iterator[tuple[Address, Address, int, int]]:
    """(local, remote, state, uid) of every TCP socket of this network namespace, IPv4-mapped peers as IPv4."""
    for e in tcptable.entries(tables):
        yield (plain(e.local[0]), e.local[1]), (plain(e.remote[0]), e.remote[1]), e.state, e.uid


def owner_uid(local: Address, remote: Address, tables: tuple[tuple[int, str], ...] = TABLES) -> int | None:
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


# linux/inet_diag.h
_NOCOOKIE = 0xFFFFFFFF
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
    message = tcptable.request(SOCK_DIAG_BY_FAMILY, tcptable.NLM_F_REQUEST, 1, body)
    with tcptable.open_netlink() as nl:
        nl.settimeout(2.0)
        nl.send(message)
        reply = nl.recv(65536)
    length, kind, _flags, _seq, _pid = _HEADER.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _HEADER.size)
        if -code == errno.ENOENT:
            return None
        tcptable.raise_error(reply, 0)
    if kind != SOCK_DIAG_BY_FAMILY or length < _HEADER.size + _MSG.size:
        raise OSError(errno.EPROTO, f"sock_diag: unexpected reply type {kind}")
    msg = _MSG.unpack_from(reply, _HEADER.size)
    # The kernel's exact lookup falls back to a listening socket on the same port when no connection
    # matches (inet_lookup): only the connection itself, both ends as asked, names its owner.
    sport, dport, src, dst = _SOCKID.unpack_from(msg[4])
    if msg[1] == LISTEN or (sport, dport) != (local[1], remote[1]) or \
            (src, dst) != (_packed(local[0]), _packed(remote[0])):
        return None
    return int(msg[8])



def listener_uid(local: Address, tables: tuple[tuple[int, str], ...] = TABLES) -> int | None:
    """The uid owning the TCP socket listening on `local`, if any."""
    for here, _there, state, uid in entries(tables):
        if state == LISTEN and here == local:
            return uid
    return None
