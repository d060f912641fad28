"""An export's clients as sock_diag tells them: the same connections psutil finds (which reads /proc/net/tcp*),
for IPv4 and IPv6 listeners, only those of the process and port asked about; psutil where netlink is refused."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from nbd_pool.adapters import tcp_diag
from nbd_pool.adapters.qemu_nbd import NbdClient, clients_of, connected_clients

from ..helpers import free_range

# A listener in another process, as qemu-nbd is: it holds what it accepts and says so.
SERVER = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("ready", flush=True)
held = []
while True:
    held.append(s.accept()[0])
    print("accepted", flush=True)
"""


@contextlib.contextmanager
def listener(host: str, port: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, host, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def psutil_clients(pid: int, port: int) -> list[NbdClient]:
    """What nbd-pool asked psutil before (it reads /proc/net/tcp and tcp6): the reference."""
    proc = psutil.Process(pid)
    conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
    return _sorted([NbdClient(c.raddr.ip, c.raddr.port) for c in conns
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port and c.raddr])


def _sorted(clients: list[NbdClient]) -> list[NbdClient]:
    return sorted(clients, key=lambda c: (c.host, c.port))


def connect(stack: contextlib.ExitStack, proc: subprocess.Popen[str], host: str, port: int) -> socket.socket:
    """A connection the listener has accepted (and so holds)."""
    conn = stack.enter_context(socket.create_connection((host, port)))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
    return conn


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_clients_are_those_psutil_finds_ipv4_and_ipv6() -> None:
    ports = free_range(3)
    hosts = ["127.0.0.1", "::1"] if _ipv6_loopback() else ["127.0.0.1"]
    with contextlib.ExitStack() as stack:
        targets = []
        expected = []
        for host, port, count in zip(hosts, ports, (2, 1)):
            proc = stack.enter_context(listener(host, port))
            conns = [connect(stack, proc, host, port) for _ in range(count)]
            want = _sorted(psutil_clients(proc.pid, port))
            assert want == _sorted([NbdClient(*c.getsockname()[:2]) for c in conns])
            targets.append((proc.pid, port))
            expected.append(want)
        # The port of the last range slot: nobody listens there.
        targets += [(targets[0][0], ports[-1]), (os.getpid(), targets[0][1])]
        got = [_sorted(c) for c in clients_of(targets)]
        assert got == expected + [[], []]  # another port of the process; another process on the port
        assert _sorted(connected_clients(*targets[0])) == expected[0]


def test_a_process_that_is_gone_has_no_clients() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert connected_clients(proc.pid, free_range(1).start) == []
    assert clients_of([]) == []


@pytest.mark.parametrize("where", ["socket", "request"])
def test_proc_net_tcp_answers_where_netlink_is_refused(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """nbd-pool's unit allows no AF_NETLINK (the socket is refused), or a kernel may refuse the request: then
    /proc/net/tcp*, with the same answers as psutil's."""
    ports = free_range(2)
    hosts = ["127.0.0.1", "::1"] if _ipv6_loopback() else ["127.0.0.1"]
    with contextlib.ExitStack() as stack:
        targets, expected = [], []
        for host, port in zip(hosts, ports):
            proc = stack.enter_context(listener(host, port))
            connect(stack, proc, host, port)
            targets.append((proc.pid, port))
            expected.append(_sorted(psutil_clients(proc.pid, port)))
        assert all(len(e) == 1 for e in expected)

        def refused(*args: object) -> socket.socket:
            code = errno.EAFNOSUPPORT if where == "socket" else errno.EINVAL
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(tcp_diag, "open_netlink" if where == "socket" else "_dump", refused)
        assert [_sorted(c) for c in clients_of(targets)] == expected
