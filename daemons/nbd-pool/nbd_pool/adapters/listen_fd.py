"""Listening sockets that nbd-pool binds itself and hands to qemu-nbd by systemd socket activation.

Why: qemu-nbd 7.2 never sets TCP_NODELAY on the connections it accepts, so a client with requests in
flight (the VMA pipelines its writes) waits out delayed ACKs: ~40 ms stalls, measured 2852 µs per request
at 16 in flight against 215 µs when qemu-nbd accepts from a listener that has TCP_NODELAY set (Linux
accepted sockets inherit it). Binding here also leaves no window between lease and bind in which another
process can take the port, and a bind failure is known at once, as an errno rather than a qemu-nbd exit.

How: qemu-nbd takes no descriptor for its listener on the command line (--bind/--port only); its one way
to be given a socket is socket activation (LISTEN_FDS=1, the socket at fd 3, LISTEN_PID equal to its own
pid; it ignores the variables otherwise). The pid is known only inside the child, so the daemon spawns
`python3 -I -S .../listen_fd_launcher.py FD -- qemu-nbd ...`: the launcher moves the socket to fd 3, sets the
variables to its own pid and execs qemu-nbd, which keeps that pid. No shell, no preexec_fn (not safe in a
threaded daemon). The exec'd process's cmdline is qemu-nbd's own argv, as adoption expects. The launcher is
a file of this package run isolated (no site, nothing imported but os and sys): it is on the path of every
export start, and a bare interpreter starts in a quarter of the time `python3 -m` of this module took.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Sequence

from .ports import address_family

#: Run by path with `python3 -I -S`, where sys.path has neither this package nor the script's directory.
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "listen_fd_launcher.py")
BACKLOG = 64  # a VMA opens a few connections per disk and reconnects; qemu's own listeners use 1..SOMAXCONN


class PortInUse(Exception):
    """Another listener holds the address."""


def listen(host: str, port: int, *, backlog: int = BACKLOG) -> socket.socket:
    """A TCP listener on host:port with SO_REUSEADDR (as qemu sets it) and TCP_NODELAY, which the sockets
    it accepts inherit. Not inheritable: pass it to a child with pass_fds. Raises PortInUse or OSError."""
    sock = socket.socket(address_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{host}:{port} is already bound by another process") from exc
            raise
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def launcher_argv(fd: int, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` with the listener `fd` socket-activated (fd must be in pass_fds)."""
    return [sys.executable, "-I", "-S", LAUNCHER, str(fd), "--", *argv]
