"""Hosts as URLs and addresses write them: an IPv6 literal goes in brackets (``[::1]:5555``).

Pure code, shared by the server and the probe.
"""

from __future__ import annotations


def bracketed(host: str) -> str:
    """``[host]`` for an IPv6 literal (brackets added once), any other host as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bare_host(host: str) -> str:
    """host without the brackets of an IPv6 literal written as [::1]."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"{bracketed(host)}:{port}"
