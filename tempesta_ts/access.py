"""Which sources may send: the ``allowed_sources`` CIDR list, for UDP and TCP alike."""

from __future__ import annotations

import ipaddress
from typing import Iterable

_CACHE_MAX = 65536


def instance_address(host: str) -> str:
    """The address that names an instance; an IPv4-mapped IPv6 address becomes plain IPv4.

    A dual-stack listener sees IPv4 peers as ``::ffff:a.b.c.d``; TCP and UDP must agree.
    """
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class SourceFilter:
    """Answers whether a source address is allowed; everyone when the list is empty."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)
        #: True when every source is allowed (the hot path asks this first).
        self.open = not self.networks
        self._cache: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        """Whether datagrams and connections from this address are taken in."""
        if not self.networks:
            return True
        verdict = self._cache.get(host)
        if verdict is None:
            verdict = self._check(host)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[host] = verdict
        return verdict

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        return any(address in network for network in self.networks)
