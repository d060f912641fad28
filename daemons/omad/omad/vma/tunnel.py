"""The VMA's tunnel account: what an approved key may do in sshd, and how a tunnelled TCP peer is recognised.

An approved key logs in as the tunnel user (sshd's AuthorizedKeysCommand prints its line, see
`omactl vma authorized-keys`). The line's options are the whole permission: `restrict` (no PTY, agent, X11,
user rc, forwarding) then `port-forwarding` back on, limited by `permitopen` to this appliance's API port and
the NBD port range on 127.0.0.1, and by `permitlisten` to the one remote forward of the VMA's API; any command
or shell runs nologin. See sshd(8), "AUTHORIZED_KEYS FILE FORMAT".

The forwarding half of an sshd session runs as the tunnel user, so a connection that arrives through the
tunnel is a loopback connection whose other end the kernel lists as owned by that user.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pwd
from urllib.parse import urlsplit

from ..adapters import socktable
from .keys import SshKey

log = logging.getLogger(__name__)

NOLOGIN = "/usr/sbin/nologin"


@dataclasses.dataclass(frozen=True)
class TunnelSpec:
    user: str
    api_port: int
    nbd_ports: range
    vma_listen: tuple[str, int]  # the VMA's API forwarded back to this appliance (its remote forward)

    @classmethod
    def of(cls, user: str, api_port: int, nbd_first: int, nbd_last: int, vma_url: str) -> TunnelSpec:
        u = urlsplit(vma_url)
        return cls(user, api_port, range(nbd_first, nbd_last + 1),
                   (u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)))

    @property
    def permitopen(self) -> list[str]:
        return [f"127.0.0.1:{self.api_port}", *(f"127.0.0.1:{p}" for p in self.nbd_ports)]

    @property
    def permitlisten(self) -> str:
        host, port = self.vma_listen
        return f"{host}:{port}"

    def options(self) -> str:
        opens = ",".join(f'permitopen="{p}"' for p in self.permitopen)
        return f'restrict,port-forwarding,command="{NOLOGIN}",{opens},permitlisten="{self.permitlisten}"'

    def authorized_line(self, key: SshKey, comment: str) -> str:
        return f"{self.options()} {key.openssh} {comment}".rstrip()

    def ssh_options(self) -> str:
        """How the VMA opens the tunnel (shown with an approved enrollment's result)."""
        host, port = self.vma_listen
        return (f"-N -o ExitOnForwardFailure=yes -o ServerAliveInterval=30 -o ServerAliveCountMax=3 "
                f"-L {self.api_port}:127.0.0.1:{self.api_port} "
                f"-L {self.nbd_ports.start}-{self.nbd_ports.stop - 1}:127.0.0.1:<same port> "
                f"-R {host}:{port}:127.0.0.1:<VMA API port>")


def tunnel_uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


class TunnelPeers:
    """Tells whether the peer of one of omad's TCP connections is the VMA's SSH tunnel (the tunnel user's socket)."""

    def __init__(self, user: str) -> None:
        self.user = user

    def _check(self, peer: tuple[str, int], local: tuple[str, int]) -> bool:
        uid = tunnel_uid(self.user)
        if uid is None:
            return False
        there = socktable.normalise(*peer)
        if not there[0].is_loopback:
            return False
        return socktable.owner_uid(there, socktable.normalise(*local)) == uid

    async def is_tunnel(self, peer: tuple[str, int] | None, local: tuple[str, int] | None) -> bool:
        if not peer or not local:
            return False  # not TCP (a unix socket): no kernel table to ask
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._check, peer[:2], local[:2])
        except (OSError, ValueError) as e:
            log.warning("cannot tell the owner of TCP peer %s: %s", peer, e)
            return False


def vma_tunnel_up(user: str, listen: tuple[str, int]) -> bool:
    """Whether a socket owned by the tunnel user listens on the VMA's forwarded API address."""
    uid = tunnel_uid(user)
    if uid is None:
        return False
    try:
        return socktable.listener_uid(socktable.normalise(*listen)) == uid
    except (OSError, ValueError):
        return False

