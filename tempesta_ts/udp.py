"""The UDP listener: netconsole datagrams from every instance into the buffer registry."""

from __future__ import annotations

import errno
import socket
from typing import Sequence

from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol

from tempesta_ts.access import instance_address
from tempesta_ts.intake import Intake
from tempesta_ts.recvmmsg import BatchReader

# Linux only; the kernel lets CAP_NET_ADMIN pass net.core.rmem_max with it.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Once the socket is drained, reading rests this long so that the next wake-up finds a batch.
#: At 50,000 datagrams/s that is about 50 datagrams per wake-up instead of one or two; a
#: netconsole line reaches its buffer at most this much later.
READ_PAUSE_SECONDS = 0.001
#: Resting needs room for what arrives meanwhile: 1 ms at 200,000 datagrams/s is 200 of them.
#: Measured on Linux 6.18, the 208 KiB default buffer holds 256 small datagrams, 1 MiB about
#: 2,500, 8 MiB about 20,000. A smaller buffer than this means no rest.
MIN_BUFFER_TO_REST = 1024 * 1024
#: Datagrams read in one go before the reactor gets a turn (timers, TCP, the web endpoint).
MAX_BATCH = 2048
# Datagram sockets: these mean "nothing more now" or an ICMP error for an earlier send.
_DRAINED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


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


class NetconsolePort(udp.Port):
    """Twisted's UDP port, reading in batches and optionally sharing its port (SO_REUSEPORT).

    A fast receiver woken for every datagram spends more on waking (epoll, the reactor's
    turn, the final EAGAIN) than on the datagram. Once the socket is drained it stops
    reading for READ_PAUSE_SECONDS; the kernel queues what comes meanwhile. Where the C
    library has recvmmsg, one system call reads up to 64 datagrams (`recvmmsg.BatchReader`).
    """

    def __init__(self, port, proto, interface="", maxPacketSize=65535, reactor=None,
                 reuse_port=False, pause=READ_PAUSE_SECONDS, batch_reads=True):
        super().__init__(port, proto, interface, maxPacketSize, reactor)
        self.reuse_port = reuse_port
        self.pause = pause
        self.batch_reads = batch_reads
        #: Reads many datagrams a system call; None: one recvfrom a datagram.
        self.reader: BatchReader | None = None
        self._resume = None

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def startListening(self) -> None:
        super().startListening()
        if self.batch_reads and BatchReader.available():
            self.reader = BatchReader(self.socket)

    def doRead(self) -> None:
        recvfrom, size, reader = self.socket.recvfrom, self.maxPacketSize, self.reader
        batch: list[tuple[bytes, tuple]] = []
        append = batch.append
        drained = False
        failure = None
        while len(batch) < MAX_BATCH:
            try:
                if reader is None:
                    append(recvfrom(size))
                elif reader.read(append) < reader.slots:
                    # Fewer than it had room for: nothing more was queued.
                    drained = True
                    break
            except OSError as e:
                if e.errno in _DRAINED:
                    drained = True
                    break
                if e.errno != errno.ECONNREFUSED:
                    failure = e
                    break
        if batch:
            # The protocol catches its own failures; nothing read may stop the reading.
            try:
                self.protocol.datagramsReceived(batch)
            except BaseException:
                udp.log.err()
        if failure is not None:
            # Twisted would close the port; a collector must go on listening. What was read
            # is kept, the error counted, and reading rests before it tries again.
            self.protocol.readFailed(failure)
            drained = True
        if drained:
            self._rest()

    def _rest(self) -> None:
        if self.pause > 0 and self._resume is None:
            self.stopReading()
            self._resume = self.reactor.callLater(self.pause, self._wake)

    def _wake(self) -> None:
        self._resume = None
        if self.connected:
            self.startReading()

    def connectionLost(self, reason=None) -> None:
        if self._resume is not None:
            if self._resume.active():
                self._resume.cancel()
            self._resume = None
        super().connectionLost(reason)


def listen_netconsole(reactor, port: int, protocol: DatagramProtocol, interface: str,
                      reuse_port: bool = False) -> NetconsolePort:
    """Listen for netconsole on a `NetconsolePort` (the reactor must be a posix one)."""
    listening = NetconsolePort(port, protocol, interface, 65535, reactor, reuse_port)
    listening.startListening()
    granted = listening.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if granted < MIN_BUFFER_TO_REST:
        listening.pause = 0.0
    return listening


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
        self.datagramsReceived(((data, addr),))

    def datagramsReceived(self, batch: Sequence[tuple[bytes, tuple]]) -> None:
        """What one read of the socket found: (datagram, source address) pairs, in order."""
        intake = self.intake
        registry, sources, stats = intake.registry, intake.sources, intake.stats
        now = intake.clock.seconds()
        received = 0
        for data, addr in batch:
            # Nothing may escape: Twisted would log a traceback for every datagram of a flood.
            try:
                received += len(data)
                host = addr[0]
                if ":" in host:
                    host = instance_address(host)
                if sources.open or intake.admits(host, "UDP"):
                    registry.receive_datagram(host, data, now)
            except Exception:
                intake.failed("udp", addr)
        stats["datagrams"] += len(batch)
        stats["bytes"] += received

    def readFailed(self, error: OSError) -> None:
        """The socket failed to give a datagram: counted, logged once per burst."""
        try:
            raise error
        except OSError:
            self.intake.failed("udp", "the socket")
