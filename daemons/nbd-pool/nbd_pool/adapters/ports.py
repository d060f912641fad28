"""Whether a TCP port can be listened on, probed by binding, to skip ports that foreign processes hold."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable


class PortProbeError(Exception):
    """The address itself cannot be bound (not configured on this host, bad syntax): no port will ever be free."""


def address_family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError as exc:
        raise PortProbeError(f"{host!r} is not an IP address") from exc


def port_is_free(host: str, port: int, *, reuse_addr: bool = True) -> bool:
    """True if a listener could bind host:port now. A bind syscall only, so cheap enough for the event loop.

    `reuse_addr=True` (the default) asks exactly what qemu-nbd will ask: QEMU sets SO_REUSEADDR on its
    listening sockets (util/qemu-sockets.c, socket_set_fast_reuse), so a port whose last connection lingers
    in TIME_WAIT is free for qemu-nbd, while any live listener (ours or foreign, on this address or on the
    wildcard) still makes the bind fail. With `reuse_addr=False` a port stays "busy" for the TIME_WAIT
    period (60 s on Linux) after every export that a client used, which would make the pool report
    recently used ports as held by foreign processes.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    with socket.socket(address_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1 if reuse_addr else 0)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise PortProbeError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    return True


def busy_ports(host: str, ports: Iterable[int], *, reuse_addr: bool = True) -> list[int]:
    """The ports in `ports` that cannot be bound on host now, in the given order."""
    return [p for p in ports if not port_is_free(host, p, reuse_addr=reuse_addr)]
