"""The UDP listener: netconsole datagrams from every instance into the buffer registry."""

from __future__ import annotations

import socket

from twisted.internet.protocol import DatagramProtocol

from tempesta_ts.access import instance_address
from tempesta_ts.intake import Intake

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

    noisy = False

    def __init__(self, intake: Intake, receive_buffer: int = 0) -> None:
        self.intake = intake
        self.receive_buffer_wanted = receive_buffer
        #: What the kernel granted, known once listening.
        self.receive_buffer_granted: int | None = None

    def startProtocol(self) -> None:
        if self.receive_buffer_wanted:
            handle = self.transport.getHandle()
            self.receive_buffer_granted = enlarge_receive_buffer(handle, self.receive_buffer_wanted)

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        # Nothing may escape: Twisted would log a traceback for every datagram of a flood.
        intake = self.intake
        try:
            host = instance_address(addr[0])
            stats = intake.stats
            stats["datagrams"] += 1
            stats["bytes"] += len(data)
            if intake.admits(host, "UDP"):
                intake.registry.receive_datagram(host, data, intake.clock.seconds())
        except Exception:
            intake.failed("udp", addr)
