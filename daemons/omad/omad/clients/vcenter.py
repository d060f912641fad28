"""vCenter over pyvmomi: a login test that ends within a bounded time and says clearly why it failed.

pyvmomi is blocking, so each login runs in a small thread pool of its own; every socket operation is
bounded (the stub's `timeout`, which pyvmomi 6.7 takes only through `schemeArgs`) and the whole test is
bounded again with `asyncio.wait_for`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import hmac
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit


from oma_common.errors import Invalid

log = logging.getLogger(__name__)

# An API version every vCenter since 6.0 serves and both pyvmomi 6.7 and 9 know; enough to log in.
_API_VERSION = "vim.version.version10"

# Why a test failed, for the GUI and for scripts.
OK = "ok"
INVALID_CREDENTIALS = "invalid_credentials"
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
TLS = "tls"
NOT_VCENTER = "not_vcenter"


@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """`vc.example.com`, `vc:8443`, `10.0.0.5`, `[fd00::5]:443` or `https://vc.example.com/sdk` → host and port."""
    raw = text.strip()
    if not raw or any(c.isspace() for c in raw):
        raise Invalid("invalid vCenter host", f"{text!r} is not a host name or address")
    try:
        parts = urlsplit(raw if "://" in raw else "https://" + raw)
    except ValueError as e:  # e.g. an unmatched "[" or "]": "Invalid IPv6 URL"
        raise Invalid("invalid vCenter host", f"{text!r} is not a host name or address: {e}") from e
    if parts.scheme not in ("https", "http") or parts.path not in ("", "/", "/sdk", "/sdk/") or parts.query:
        raise Invalid("invalid vCenter host", f"{text!r}: give a host name or address, optionally with :port")
    try:
        port = parts.port or 443
    except ValueError as e:
        raise Invalid("invalid vCenter host", f"{text!r}: the port is not a number from 1 to 65535") from e
    host = parts.hostname or ""
    if not host or parts.username or parts.password:
        raise Invalid("invalid vCenter host", f"{text!r} names no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if not all(label and len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
                   for label in labels):
            raise Invalid("invalid vCenter host", f"{text!r} is not a valid host name") from None
    return Address(host, port)


@dataclasses.dataclass
class LoginTest:
    success: bool
    reason: str  # OK or one of the failure reasons above
    message: str
    elapsed_ms: int
    server: str = ""  # vCenter's product name and version when the login worked
    thumbprint: str = ""  # SHA-256 of the certificate the server presented, to pin a self-signed vCenter


# What a client may send as a pin: a SHA-256 (64 hex digits) or SHA-1 (40, as older vSphere screens show it)
# fingerprint, in hex pairs optionally joined by colons.
THUMBPRINT_PATTERN = "^(?:[0-9A-Fa-f]{2}:?){19}(?:(?:[0-9A-Fa-f]{2}:?){12})?[0-9A-Fa-f]{2}$"
_DIGESTS = {64: "sha256", 40: "sha1"}  # hex digits → the hash that gives that many


def thumbprint_of(der: bytes, algorithm: str = "sha256") -> str:
    """A certificate's fingerprint as vSphere shows it: upper-case hex pairs joined by colons."""
    digest = hashlib.new(algorithm, der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def normalise_thumbprint(text: str) -> str:
    """AA:BB:... of a SHA-256 or SHA-1 fingerprint given with or without colons, in either case."""
    stripped = text.strip()
    if not re.fullmatch(THUMBPRINT_PATTERN, stripped):
        raise Invalid("invalid thumbprint", "a certificate thumbprint is the 64 hex digits of its SHA-256 (or the "
                                            "40 of its SHA-1), in pairs optionally joined by colons")
    hexits = stripped.replace(":", "").upper()
    return ":".join(hexits[i:i + 2] for i in range(0, len(hexits), 2))


def _algorithm(pin: str) -> str:
    return _DIGESTS[len(pin.replace(":", ""))]


class PinnedContext(ssl.SSLContext):
    """TLS that trusts exactly one certificate, named by its SHA-256: checked on the very connection that
    carries the login, right after the handshake (a self-signed vCenter, pinned on first test)."""

    pin: str = ""
    seen: str = ""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        der = sock.getpeercert(binary_form=True) or b""
        self.seen = thumbprint_of(der, _algorithm(self.pin))
        if not hmac.compare_digest(self.seen, self.pin):
            sock.close()
            err = ssl.SSLCertVerificationError(f"thumbprint {self.seen} is not the pinned {self.pin}")
            err.verify_message = f"its thumbprint {self.seen} is not the pinned one ({self.pin})"
            raise err
        return sock


class VCenter:
    """Direct vCenter calls. Only the credential test today; inventory goes through the VMA.

    Certificates are checked: against the call's pin (a thumbprint) when it has one, else against the CA
    store (`ca_file`, or the system's). `verify_tls` false turns the CA check off for unpinned calls only.
    """

    def __init__(self, *, timeout: float, verify_tls: bool, ca_file: str = "") -> None:
        self.timeout = timeout
        self.verify_tls = verify_tls
        self.ca_file = ca_file
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="vcenter")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def test_login(self, host: str, username: str, password: str, *, thumbprint: str = "") -> LoginTest:
        """Log in and out. With `thumbprint` the server must present exactly that certificate; without, it
        must be trusted (unless verification is off); an untrusted one's thumbprint is in the answer."""
        address = parse_address(host)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._login, address, username, password, thumbprint)
        untrusted = False
        try:
            # A little over the socket timeout: the socket should give up first, with the better reason.
            server = await asyncio.wait_for(future, self.timeout + 2)
            reason, message = OK, f"logged in to {server}"
        except asyncio.TimeoutError:
            reason, message = TIMEOUT, f"{address} did not answer within {self.timeout:g} s"
            server = ""
        except Exception as e:  # every failure becomes a reason; the log keeps the exception
            reason, message = explain(e, address)
            server = ""
            untrusted = isinstance(e, ssl.SSLCertVerificationError)
            log.info("vCenter login test on %s as %s failed: %s (%r)", address, username, reason, e)
        seen = normalise_thumbprint(thumbprint) if thumbprint and reason == OK else ""
        if untrusted:
            seen = await loop.run_in_executor(self._pool, self._presented, address)
            if seen and not thumbprint:
                message += (f"; if this is your vCenter's certificate, pin it: save its thumbprint {seen} "
                            "as the credential's tls_thumbprint")
        elapsed = int((time.monotonic() - started) * 1000)
        return LoginTest(reason == OK, reason, message, elapsed, server, seen)

    def _context(self, thumbprint: str = "") -> ssl.SSLContext:
        if thumbprint:
            pinned = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
            pinned.check_hostname = False
            pinned.verify_mode = ssl.CERT_NONE  # the pin is the check (wrap_socket)
            pinned.pin = normalise_thumbprint(thumbprint)
            return pinned
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _presented(self, address: Address) -> str:
        """The thumbprint of the certificate the server presents (read without trusting it, to show)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection((address.host, address.port), timeout=self.timeout) as raw:
                with context.wrap_socket(raw, server_hostname=address.host) as tls:
                    return thumbprint_of(tls.getpeercert(binary_form=True) or b"")
        except OSError:
            return ""

    def _login(self, address: Address, username: str, password: str, thumbprint: str = "") -> str:
        # pyVmomi on first use: its type tables cost every omad start ~0.2 s of CPU, most never see a vCenter.
        from pyVmomi import SoapStubAdapter, vim

        stub = SoapStubAdapter(host=address.host, port=address.port, version=_API_VERSION,
                               sslContext=self._context(thumbprint), connectionPoolTimeout=-1)
        stub.schemeArgs["timeout"] = self.timeout  # http.client's per-operation socket timeout
        try:
            content = vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()
            sessions: Any = content.sessionManager  # pyVmomi's stubs: Optional, and Login's locale is optional
            sessions.Login(username, password)
            try:
                return str(content.about.fullName)
            finally:
                sessions.Logout()
        finally:
            for conn in stub.pool:
                conn[0].close()


def explain(e: BaseException, address: Address) -> tuple[str, str]:
    """A failure reason and a sentence for a person."""
    from pyVmomi import vim, vmodl

    if isinstance(e, vim.fault.InvalidLogin):
        return INVALID_CREDENTIALS, f"{address} refused the user name or password"
    if isinstance(e, ssl.SSLCertVerificationError):
        return TLS, f"the certificate of {address} is not trusted: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return TLS, f"no TLS session with {address} (is it a vCenter's HTTPS port?): {e.reason or e}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return TIMEOUT, f"{address} did not answer within the time limit"
    if isinstance(e, socket.gaierror):
        return UNREACHABLE, f"the name {address.host} does not resolve: {e.strerror}"
    if isinstance(e, ConnectionRefusedError):
        return UNREACHABLE, f"{address} refused the connection (nothing listens on that port)"
    if isinstance(e, OSError) and not isinstance(e, http.client.HTTPException):
        return UNREACHABLE, f"cannot reach {address}: {e.strerror or e}"
    if isinstance(e, vmodl.MethodFault):
        return NOT_VCENTER, f"{address} answered the login with a fault: {e.msg or type(e).__name__}"
    return NOT_VCENTER, f"{address} does not answer like a vCenter: {type(e).__name__}: {e}"
