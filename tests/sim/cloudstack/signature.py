"""CloudStack's request signature, checked as the management server checks it (ApiServer.verifyRequest).

Every parameter but `signature`, sorted by name, rendered `name=URLEncoder.encode(value).replace("+", "%20")`,
joined with `&`, the whole string lower-cased, then HMAC-SHA1 with the user's secret key, base64. With
`signatureVersion=3` the request also carries `expires` (ISO 8601 with a UTC offset) and is refused after it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timezone

# java.net.URLEncoder leaves these alone; everything else is %XX of its UTF-8 bytes, and space becomes "+".
_JAVA_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_")


def java_url_encode(value: str) -> str:
    """URLEncoder.encode(value, "UTF-8").replaceAll("\\+", "%20"), as CloudStack renders values to sign."""
    out = []
    for byte in value.encode("utf-8"):
        if byte in _JAVA_SAFE:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def unsigned_request(params: Mapping[str, str]) -> str:
    pairs = sorted((k, v) for k, v in params.items() if k.lower() != "signature")
    return "&".join(f"{k}={java_url_encode(v)}" for k, v in pairs).lower()


def sign(params: Mapping[str, str], secret: str) -> str:
    digest = hmac.new(secret.encode("utf-8"), unsigned_request(params).encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def expired(params: Mapping[str, str], now: datetime | None = None) -> bool:
    """signatureVersion 3: `expires` in the past (or unreadable) refuses the request."""
    lowered = {k.lower(): v for k, v in params.items()}
    if lowered.get("signatureversion") != "3":
        return False
    text = lowered.get("expires", "")
    try:
        when = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return True
    return when < (now or datetime.now(timezone.utc))


def verify(params: Mapping[str, str], secret: str) -> bool:
    given = next((v for k, v in params.items() if k.lower() == "signature"), "")
    if not given or expired(params):
        return False
    return hmac.compare_digest(sign(params, secret), given)
