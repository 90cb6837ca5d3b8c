"""Who may read the pages that show log text and reports: loopback clients, and others that
give the status_token. Pure code: the peer's address and the request's words are passed in.

Kernel logs hold client data (addresses, URIs), so /status, /status.json, /instances/... and
/reports... follow this rule; /metrics, /healthz and / show none and stay open.
"""

from __future__ import annotations

import hmac
import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether a peer address is a loopback address (127.0.0.0/8, ::1, or IPv4-mapped)."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def given_token(authorization: bytes | None, query: bytes | None) -> bytes | None:
    """The token a request gives: ``Authorization: Bearer TOKEN``, else ``?token=TOKEN``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip()
    return query or None


def may_read(peer: str | None, token: str | None, authorization: bytes | None = None,
             query: bytes | None = None) -> bool:
    """Whether a request may read log text: from loopback, or with the configured token
    (compared in constant time); never with a token when none is configured."""
    if is_loopback(peer):
        return True
    if not token:
        return False
    given = given_token(authorization, query)
    return given is not None and hmac.compare_digest(given, token.encode("utf-8"))
