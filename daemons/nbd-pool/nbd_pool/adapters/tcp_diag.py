"""Which established TCP connections processes hold on their listening ports, asked of the kernel (sock_diag).

psutil's `connections()` reads /proc/<pid>/net/tcp and tcp6; the kernel prints them by walking every bucket of
the host's established-connection hash (sized by memory, not by use: 4-8 ms a walk on a 2-CPU, 23 GiB test
machine under load), twice per export, on every `GET /exports` and reconciliation pass (30 ms a listing with
one export, bench/agent_calls). Here one sock_diag dump per address family answers for all the ports at once:
the listening sockets first (their table is small: tens of µs), which tell each process's listener and so the
only family its connections can have (an IPv6 listener's IPv4 clients are IPv6 sockets with mapped addresses),
then the established ones of that family, filtered in the kernel to the ports' range (inet_diag bytecode, as
`ss 'sport >= :A and sport <= :B'` sends, linux/inet_diag.h). A connection counts for a process only if the
process holds its socket (/proc/<pid>/fd), as psutil had it. Where netlink is refused (nbd-pool's unit does not
list AF_NETLINK in RestrictAddressFamilies=), /proc/net/tcp and tcp6 are read once for all the ports: 4-5x the
netlink cost, still a fraction of psutil's (which read and parsed both tables for each export).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

from oma_common import tcptable
from oma_common.tcptable import ESTABLISHED, HEADER, LISTEN, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, \
    SOCK_DIAG_BY_FAMILY, open_netlink

log = logging.getLogger(__name__)

INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
FAMILIES = (socket.AF_INET, socket.AF_INET6)

_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, id (unused)
_ATTR = struct.Struct("=HH")  # nlattr: len, type
_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
_MSG = struct.Struct("=BBBB2H16s16s12xIIIII")  # inet_diag_msg, the id's sport, dport, src, dst unpacked


@dataclass(frozen=True)
class Socket:
    family: int
    local_port: int
    remote_host: str
    remote_port: int
    inode: int


def _port_range(low: int, high: int) -> bytes:
    """Bytecode accepting low <= local port <= high. Each op: if true, go on to the next (`yes`: 8 bytes on);
    if false, jump 4 bytes past the program's end, which rejects (inet_diag_bc_run accepts at exactly its end).
    A port comparison's second op carries the port in its `no` field."""
    return (_OP.pack(INET_DIAG_BC_S_GE, 8, 20) + _OP.pack(0, 0, low) +
            _OP.pack(INET_DIAG_BC_S_LE, 8, 12) + _OP.pack(0, 0, high))


def _dump(nl: socket.socket, family: int, state: int, ports: tuple[int, int], seq: int) -> list[Socket]:
    bytecode = _port_range(*ports)
    attr = _ATTR.pack(_ATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << state) + attr
    nl.send(tcptable.request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
    out: list[Socket] = []
    while True:
        data = nl.recv(65536)
        offset = 0
        while offset + HEADER.size <= len(data):
            length, kind, _flags, got_seq, _pid = HEADER.unpack_from(data, offset)
            if length < HEADER.size:
                raise OSError(errno.EPROTO, "sock_diag: malformed reply")
            if got_seq == seq:
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    tcptable.raise_error(data, offset)
                if kind == SOCK_DIAG_BY_FAMILY and length >= HEADER.size + _MSG.size:
                    f, _state, _t, _r, sport, dport, _src, dst, _exp, _rq, _wq, _uid, inode = \
                        _MSG.unpack_from(data, offset + HEADER.size)
                    out.append(Socket(f, socket.ntohs(sport), socket.inet_ntop(f, dst[:4] if f == socket.AF_INET else dst),
                                      socket.ntohs(dport), inode))
            offset += (length + 3) & ~3


def established(targets: list[tuple[int, int]]) -> list[list[Socket]]:
    """For each (pid, port): the established connections on `port` whose socket `pid` holds (none when the
    process is gone or no longer listens there)."""
    if not targets:
        return []
    ports = (min(p for _, p in targets), max(p for _, p in targets))
    held = [socket_inodes(pid) for pid, _ in targets]
    try:
        found, families = _from_netlink(targets, held, ports)
    except OSError as exc:  # EAFNOSUPPORT under RestrictAddressFamilies=; a kernel refusing the request
        log.debug("sock_diag unavailable (%s): reading /proc/net/tcp*", exc)
        found, families = _from_proc(ports), [set(FAMILIES)] * len(targets)
    return [[s for s in found if s.local_port == port and s.inode in inodes and s.family in fams]
            for (_, port), inodes, fams in zip(targets, held, families)]


def _from_netlink(targets: list[tuple[int, int]], held: list[set[int]], ports: tuple[int, int]
                  ) -> tuple[list[Socket], list[set[int]]]:
    """The established sockets on the ports, of the families the targets' listeners have; those families."""
    with open_netlink() as nl:
        nl.settimeout(2.0)
        listeners = {(s.inode, s.local_port): s.family
                     for seq, family in enumerate(FAMILIES, 1) for s in _dump(nl, family, LISTEN, ports, seq)}
        # No listener of its own on the port (a qemu-nbd that stopped listening): either family, to be sure.
        families = [{f for (inode, port), f in listeners.items() if port == p and inode in inodes} or
                    (set(FAMILIES) if inodes else set()) for (_, p), inodes in zip(targets, held)]
        wanted = set().union(*families)
        found = [s for seq, family in enumerate(FAMILIES, 3) if family in wanted
                 for s in _dump(nl, family, ESTABLISHED, ports, seq)]
    return found, families


def _from_proc(ports: tuple[int, int]) -> list[Socket]:
    """The established sockets on the ports, from /proc/net/tcp and tcp6 (where netlink is refused)."""
    return [Socket(e.family, e.local[1], socket.inet_ntop(e.family, e.remote[0].packed), e.remote[1], e.inode)
            for e in tcptable.entries() if e.state == ESTABLISHED and ports[0] <= e.local[1] <= ports[1]]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets `pid` holds open (/proc/<pid>/fd links `socket:[N]`); empty when it is gone."""
    out: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return out
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out
