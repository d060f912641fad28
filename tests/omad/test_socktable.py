"""The kernel's socket table names the owner of the other end of a local TCP connection (IPv4, IPv6, dual stack)."""

from __future__ import annotations

import os
import socket

import pytest
from omad.adapters import socktable


def owner_of_client(family: socket.AddressFamily, server_host: str, client_host: str) -> int | None:
    with socket.socket(family, socket.SOCK_STREAM) as server:
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind((server_host, 0))
        server.listen()
        port = server.getsockname()[1]
        client_family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
        with socket.socket(client_family, socket.SOCK_STREAM) as client:
            client.connect((client_host, port))
            conn, peer = server.accept()
            with conn:
                local = conn.getsockname()
                assert socktable.listener_uid(socktable.normalise(*server.getsockname()[:2])) == os.getuid()
                here, there = socktable.normalise(*peer[:2]), socktable.normalise(*local[:2])
                by_proc = [uid for a, b, _state, uid in socktable.entries() if (a, b) == (here, there)]
                assert by_proc == [socktable.diag_owner_uid(here, there)]  # netlink and /proc agree
                return socktable.owner_uid(here, there)


def test_owner_of_an_ipv4_loopback_peer() -> None:
    assert owner_of_client(socket.AF_INET, "127.0.0.1", "127.0.0.1") == os.getuid()


def test_owner_of_an_ipv4_peer_of_a_dual_stack_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    assert owner_of_client(socket.AF_INET6, "::", "127.0.0.1") == os.getuid()


def test_owner_of_an_ipv6_loopback_peer() -> None:
    try:
        assert owner_of_client(socket.AF_INET6, "::1", "::1") == os.getuid()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")


def test_a_connection_that_is_not_there_has_no_owner() -> None:
    # Two ports nothing uses now (taken and given back), rather than fixed ones another test might hold.
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    assert socktable.owner_uid(socktable.normalise("127.0.0.1", ports[0]),
                               socktable.normalise("127.0.0.1", ports[1])) is None


def test_a_listener_on_the_port_is_not_taken_for_the_connection() -> None:
    """sock_diag's exact lookup falls back to a listening socket on the port; that must not count."""
    with socket.socket() as listener, socket.socket() as other:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        other.bind(("127.0.0.1", 0))
        port, unused = listener.getsockname()[1], other.getsockname()[1]
        assert socktable.owner_uid(socktable.normalise("127.0.0.1", port),
                                   socktable.normalise("127.0.0.1", unused)) is None
