"""What tempesta-ts-probe reads in the server's /status.json: its instances and counters, and
what to do about a delivery failure, by its kind (spool.last_error_kind)."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer, error


class ProbeFailed(Exception):
    """A step failed: why, in one line, and what to do about it."""

    def __init__(self, reason: str, advice: str | None = None, step: str = "server status") -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice
        self.step = step


def same_address(a: str, b: str) -> bool:
    """Whether two addresses are one instance (``::ffff:a.b.c.d`` is ``a.b.c.d``)."""
    def norm(text: str):
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return text
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped if mapped is not None else ip

    return norm(a) == norm(b)


def find_instance(doc: dict[str, Any] | None, address: str | None) -> dict[str, Any] | None:
    """The instance of ``address`` in a status document, or None."""
    if doc is None or address is None:
        return None
    for instance in doc["instances"]:
        if same_address(instance.get("address", ""), address):
            return instance
    return None


def appended(instance: dict[str, Any] | None) -> int:
    """Lines ever appended to an instance's buffer (those held plus those pushed out)."""
    if instance is None:
        return 0
    return instance.get("lines", 0) + instance.get("lines_pushed_out", 0)


def counter(doc: dict[str, Any], key: str) -> int:
    """A counter of a status document, 0 when absent."""
    return doc.get("counters", {}).get(key, 0)


def request_failure(url: str, failure) -> ProbeFailed:
    """Why /status.json could not be read, with what to check."""
    value = failure.value
    reasons = getattr(value, "reasons", None) or []
    for inner in reasons:
        value = getattr(inner, "value", value)
    where = f"cannot read the server's status at {url}"
    check = (
        "run the probe on the server's machine, or give --status-url with the server's "
        "metrics_host:metrics_port (metrics_port 0 turns the endpoint off)"
    )
    if isinstance(value, error.ConnectionRefusedError):
        return ProbeFailed(
            f"{where}: connection refused (the server is not running, or its metrics endpoint "
            "is off or elsewhere)",
            f"start the server, or {check}",
        )
    if isinstance(value, error.DNSLookupError):
        return ProbeFailed(f"{where}: the host does not resolve", check)
    if isinstance(value, (defer.TimeoutError, error.TimeoutError, defer.CancelledError)):
        return ProbeFailed(
            f"{where}: no answer in time",
            f"check that the address is reachable from here (a firewall?), or {check}",
        )
    if isinstance(value, error.ConnectError):
        return ProbeFailed(f"{where}: {value}", check)
    return ProbeFailed(f"{where}: {type(value).__name__}: {value}", check)


#: What to do about each kind of delivery failure (docs/support-api.md lists which is which).
ADVICE = {
    "tls": (
        "the server does not trust the Support Server's certificate: set support_ca_file to the "
        "PEM of the CA that signed it (skip_ssl_verification only for a test setup); when the "
        "certificate does not name support_host, set support_host to the name it is for; when "
        "the handshake itself failed, check that support_host:support_port is the Support "
        "Server's HTTPS port (not plain HTTP) and accepts TLS 1.2 or later; then restart the "
        "server; the report stays in the spool and is sent then"
    ),
    "credentials": (
        "the Support Server refused the credentials: check support_client_id and the API key "
        "(support_api_key_file or the environment) with the vendor, then restart the "
        "server; meanwhile it retries every 5 minutes"
    ),
    "refused": (
        "nothing accepts connections at support_host:support_port: check both settings and "
        "that the Support Server is up and reachable from the server's machine"
    ),
    "timeout": (
        "the Support Server is not reachable from the server's machine, or does not answer in "
        "time: check the network path (firewall, routing, outbound HTTPS allowed to "
        "support_host:support_port)"
    ),
    "dns": "support_host does not resolve on the server's machine: check the name and its DNS",
    "rejected": (
        "the Support Server refused the report for good; it is kept in "
        "spool_dir/rejected/; send the server's log line with the answer to the vendor"
    ),
    "server_error": (
        "the Support Server is failing or busy; the server retries with backoff; contact the "
        "vendor if it persists"
    ),
    "other": (
        "see the server's log for the details: an HTTP 3xx or 404 answer means the URL is not "
        "the reports endpoint (check support_host, support_port and support_path); a connection "
        "that cannot be made or is lost before an answer points at the network path or a proxy "
        "in between; a report the server cannot read back, at spool_dir's owner and permissions"
    ),
}
#: Kinds that retrying will not fix: the probe stops at once.
LASTING = frozenset({"tls", "credentials"})


def is_lasting(kind: str) -> bool:
    """Whether a delivery failure of this kind needs the operator (a retry cannot fix it)."""
    return kind in LASTING


def advice_for(kind: str) -> str:
    """What to do about a delivery failure of this kind, in plain words."""
    return ADVICE.get(kind, ADVICE["other"])


def delivery_failure(doc: dict[str, Any]) -> tuple[str | None, str]:
    """(spool.last_error, its kind) of a status document; a server too old to say the kind
    gets "other"."""
    spool = doc.get("spool") or {}
    return spool.get("last_error"), spool.get("last_error_kind") or "other"
