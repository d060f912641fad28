"""Tests for the bind-based port probe."""

from __future__ import annotations

import socket
import time

import pytest

from nbd_pool.adapters.ports import PortProbeError, busy_ports, port_is_free

pytestmark = [pytest.mark.timeout(30)]


def test_free_port_is_free(free_port: int) -> None:
    assert port_is_free("127.0.0.1", free_port)


def test_a_foreign_listener_makes_it_busy(free_port: int) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as qemu-nbd does
        listener.bind(("127.0.0.1", free_port))
        listener.listen()
        assert not port_is_free("127.0.0.1", free_port)
        assert not port_is_free("127.0.0.1", free_port, reuse_addr=False)
        assert busy_ports("127.0.0.1", [free_port, free_port]) == [free_port, free_port]
    assert port_is_free("127.0.0.1", free_port)


def test_a_wildcard_listener_makes_loopback_busy(free_port: int) -> None:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", free_port))
        listener.listen()
        assert not port_is_free("127.0.0.1", free_port)


def test_time_wait_counts_as_free_only_with_reuse_addr(free_port: int) -> None:
    # The server side closes first, as when an export is stopped under a connected client: TIME_WAIT.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", free_port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", free_port))
        conn, _ = listener.accept()
        conn.close()
    time.sleep(0.05)
    client.close()
    assert port_is_free("127.0.0.1", free_port)  # what qemu-nbd (SO_REUSEADDR) will manage
    assert not port_is_free("127.0.0.1", free_port, reuse_addr=False)


def test_bad_address_is_an_error() -> None:
    with pytest.raises(PortProbeError):
        port_is_free("not-an-ip", 10100)
    with pytest.raises(PortProbeError):
        port_is_free("192.0.2.1", 10100)  # TEST-NET-1: not configured here, EADDRNOTAVAIL
    with pytest.raises(ValueError):
        port_is_free("127.0.0.1", 70000)
