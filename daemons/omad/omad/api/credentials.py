"""/vmware-credentials: saved vCenter logins (passwords go in, never out), the default one, and a login test."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, route

from ..clients.vcenter import THUMBPRINT_PATTERN
from ..inventory.credentials import Credentials

# Any segment but "default", so /vmware-credentials/default is never read as an id whatever the route order;
# the id itself is checked by _id() (a 400, not an unmatched route).
_ID = "{credential_id:(?!default$)[^/]+}"
_DIGITS = {"credential_id": "[0-9]{1,18}"}
# A thumbprint, or '' for none.
_PIN = "^(?:" + THUMBPRINT_PATTERN.removeprefix("^").removesuffix("$") + ")?$"
_PIN_ABOUT = ("the SHA-256 (or SHA-1) fingerprint of the vCenter's certificate, hex pairs optionally joined by "
              "colons: every login with this credential accepts exactly that certificate (a self-signed "
              "vCenter; a failed test shows the thumbprint the server presented). '' = trust the CA store")


def _id(call: Call) -> int:
    text = call.params["credential_id"]
    if not text.isdigit() or len(text) > 18:
        raise Invalid("invalid credential id", f"{text!r} is not a credential id (a positive integer)")
    return int(text)


@dataclasses.dataclass
class CredentialIn:
    """A new saved vCenter login."""

    credential_name: str = name_spec(min_length=1, max_length=255)
    vcenter_host: str = name_spec(min_length=1, max_length=255, description="host, host:port or https://host/sdk")
    username: str = name_spec(min_length=1, max_length=255)
    password: str = spec(min_length=1, max_length=1024)
    datacenter: str = name_spec("", max_length=255)
    is_active: bool = spec(True)
    is_default: bool = spec(False, description="make this the default (the previous default stops being one)")
    tls_thumbprint: str = spec("", max_length=95, pattern=_PIN, description=_PIN_ABOUT)


@dataclasses.dataclass
class CredentialUpdate:
    """Fields to change; an absent or empty password keeps the stored one."""

    credential_name: str | None = name_spec(None, min_length=1, max_length=255)
    vcenter_host: str | None = name_spec(None, min_length=1, max_length=255)
    username: str | None = name_spec(None, min_length=1, max_length=255)
    password: str | None = spec(None, max_length=1024)
    datacenter: str | None = name_spec(None, max_length=255)
    is_active: bool | None = spec(None)
    is_default: bool | None = spec(None)
    tls_thumbprint: str | None = spec(None, max_length=95, pattern=_PIN,
                                      description="pin this certificate (see create); '' removes the pin")


@dataclasses.dataclass
class CredentialOut:
    """A saved vCenter login as clients see it."""

    id: int
    credential_name: str
    vcenter_host: str
    username: str
    datacenter: str
    is_active: bool
    is_default: bool
    password_set: bool
    created_by: str
    created_at: str
    updated_at: str
    last_used: str | None
    usage_count: int
    tls_thumbprint: str = spec(description="the pinned certificate's thumbprint (AA:BB:...), '' = none")


@dataclasses.dataclass
class CredentialList:
    credentials: list[CredentialOut]
    count: int


@dataclasses.dataclass
class CredentialTest:
    """The outcome of a login test; `reason` is ok, invalid_credentials, unreachable, timeout, tls or not_vcenter."""

    success: bool
    reason: str
    message: str
    credential_id: int
    vcenter_host: str
    server: str
    elapsed_ms: int
    tested_at: str
    thumbprint: str = spec(description="reason tls: the SHA-256 thumbprint of the certificate the server "
                                       "presented (pin it by saving it as tls_thumbprint); ok: the pin, if any")
    pinned: bool = spec(description="the credential pins a certificate")


def _set(body: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(body).items() if v is not None}


class CredentialsApi:
    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    @route("GET", "/vmware-credentials", response=CredentialList, tags=("vmware-credentials",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Every saved vCenter login (no passwords)."""
        items = await self.credentials.list()
        return {"credentials": items, "count": len(items)}

    @route("POST", "/vmware-credentials", errors=(Conflict,),
           body=CredentialIn, response=CredentialOut, status=201, auth=Auth.ADMIN,
           tags=("vmware-credentials",))
    async def create(self, call: Call) -> dict[str, Any]:
        """Save a vCenter login; the password is sealed at rest and never returned."""
        return await self.credentials.create(_set(call.body), actor=call.actor)

    @route("GET", "/vmware-credentials/default", errors=(NotFound,),
           response=CredentialOut, tags=("vmware-credentials",))
    async def default(self, call: Call) -> dict[str, Any]:
        """The default vCenter login; 404 when none is set."""
        return await self.credentials.default()

    @route("GET", f"/vmware-credentials/{_ID}", params=_DIGITS, errors=(NotFound,),
           response=CredentialOut, tags=("vmware-credentials",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One saved vCenter login."""
        return await self.credentials.get(_id(call))

    @route("PUT", f"/vmware-credentials/{_ID}", params=_DIGITS, errors=(NotFound, Conflict),
           body=CredentialUpdate, response=CredentialOut, auth=Auth.ADMIN,
           tags=("vmware-credentials",))
    async def update(self, call: Call) -> dict[str, Any]:
        """Change a saved vCenter login."""
        return await self.credentials.update(_id(call), _set(call.body), actor=call.actor)

    @route("DELETE", f"/vmware-credentials/{_ID}", params=_DIGITS, errors=(NotFound, Conflict),
           auth=Auth.ADMIN, tags=("vmware-credentials",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Delete a saved vCenter login; 409 while VM contexts use it."""
        credential_id = _id(call)
        await self.credentials.delete(credential_id, actor=call.actor)
        return {"success": True, "message": f"credential {credential_id} deleted"}

    # PUT is the spec's; the GUI's first proxy posted. Both are served.
    @route("PUT", f"/vmware-credentials/{_ID}/set-default", params=_DIGITS, errors=(NotFound, Conflict),
           response=CredentialOut, auth=Auth.ADMIN,
           tags=("vmware-credentials",))
    @route("POST", f"/vmware-credentials/{_ID}/set-default", params=_DIGITS, errors=(NotFound, Conflict),
           response=CredentialOut, auth=Auth.ADMIN,
           tags=("vmware-credentials",))
    async def set_default(self, call: Call) -> dict[str, Any]:
        """Make this login the default (the previous default stops being one)."""
        return await self.credentials.set_default(_id(call), actor=call.actor)

    @route("POST", f"/vmware-credentials/{_ID}/test", params=_DIGITS, errors=(NotFound, Conflict),
           response=CredentialTest, tags=("vmware-credentials",))
    async def test(self, call: Call) -> dict[str, Any]:
        """Log in to the vCenter with the stored login, within a bounded time; 200 with success false and a
        reason when it fails. The certificate must match the credential's pin or be trusted by the CA store;
        an untrusted one's thumbprint is in the answer (PUT it as tls_thumbprint to accept it). 409 when the
        stored password does not open (set it again)."""
        return await self.credentials.test(_id(call))
