"""The UDP listener: netconsole datagrams from every instance into the buffer registry."""

from __future__ import annotations

import socket
from collections import Counter

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol

from tempesta_ts.access import SourceFilter, instance_address
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.log import get_logger
from tempesta_ts.throttle import Throttle

# Linux only; the kernel lets CAP_NET_ADMIN pass net.core.rmem_max with it.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def enlarge_receive_buffer(sock: socket.socket, wanted: int) -> int:
    """Ask for a receive buffer of `wanted` bytes; return what the kernel granted.

    Plain SO_RCVBUF is capped at net.core.rmem_max; SO_RCVBUFFORCE passes the cap when the
    process has CAP_NET_ADMIN. Linux reports twice the size (bookkeeping included), so the
    granted figure is halved to compare with what was asked.
    """
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, wanted)
            break
        except OSError:
            continue
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


class NetconsoleProtocol(DatagramProtocol):
    """Takes netconsole datagrams; an instance is the datagram's source address."""

    log = get_logger(__name__)
    noisy = False

    def __init__(
        self,
        registry: BufferRegistry,
        clock: IReactorTime,
        sources: SourceFilter,
        stats: Counter,
        receive_buffer: int = 0,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.sources = sources
        self.stats = stats
        self.receive_buffer_wanted = receive_buffer
        #: What the kernel granted, known once listening.
        self.receive_buffer_granted: int | None = None
        self._throttle = Throttle(60.0)

    def startProtocol(self) -> None:
        if self.receive_buffer_wanted:
            handle = self.transport.getHandle()
            self.receive_buffer_granted = enlarge_receive_buffer(handle, self.receive_buffer_wanted)

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        # Nothing may escape: Twisted would log a traceback for every datagram of a flood.
        try:
            host = instance_address(addr[0])
            stats = self.stats
            stats["datagrams"] += 1
            stats["bytes"] += len(data)
            if not self.sources.allows(host):
                self._reject(host)
                return
            self.registry.receive_datagram(host, data, self.clock.seconds())
        except Exception:
            self.stats["udp_errors"] += 1
            held = self._throttle.hit("error", self.clock.seconds())
            if held is not None:
                self.log.failure(
                    "Failed to take in a datagram from {source} ({held} more failures held back)",
                    source=addr,
                    held=held,
                )

    def _reject(self, host: str) -> None:
        self.stats["sources_rejected"] += 1
        held = self._throttle.hit(("reject", host), self.clock.seconds())
        if held is not None:
            self.log.warn(
                "Rejected UDP from {source}: not in allowed_sources "
                "({held} more held back since the last notice)",
                source=host,
                held=held,
            )
