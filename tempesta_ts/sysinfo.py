"""The TCP listener: system information and other documents from the instances.

The vendor's System Verification Script connects, sends ``<sys-info>`` + one JSON object on one
line + ``</sys-info>`` with no newline, and closes. ``nc HOST PORT < file`` sends plain text ended
by the peer closing (full close or half-close). Either becomes the instance's latest system
information.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from tempesta_ts.access import instance_address
from tempesta_ts.buffers import SystemInfo
from tempesta_ts.errors import StartupError
from tempesta_ts.files import check_private_directory, read_regular
from tempesta_ts.intake import Intake
from tempesta_ts.log import get_logger
from tempesta_ts.netconsole import decode_text

OPEN_TAG = b"<sys-info>"
CLOSE_TAG = b"</sys-info>"


def make_system_info(raw: bytes, received_at: float, peer: str) -> SystemInfo:
    """A document as kept: its text, and whether that text is JSON."""
    text = decode_text(raw)
    try:
        json.loads(text)
        kind = "json"
    except ValueError:
        kind = "text"
    return SystemInfo(received_at=received_at, text=text, format=kind, peer=peer)


@implementer(IHalfCloseableProtocol)
class SystemInfoProtocol(LineReceiver, TimeoutMixin):
    """Receives documents from one connection.

    LineReceiver's line mode does not fit a document of many MiB with no newline (its
    delimiter is CRLF and MAX_LENGTH drops the connection at 16 KiB; re-splitting a growing
    buffer is quadratic), so the protocol runs in raw mode and looks for the closing tag only
    in the new bytes.
    """

    def connectionMade(self) -> None:
        factory: SystemInfoFactory = self.factory
        self.host = instance_address(self.transport.getPeer().host)
        self.callLater = factory.clock.callLater
        self._document = bytearray()
        self._discarding = False
        factory.connections += 1
        self.setRawMode()
        self.setTimeout(factory.idle_seconds)

    def rawDataReceived(self, data: bytes) -> None:
        try:
            self.resetTimeout()
            if self._discarding:
                return
            factory: SystemInfoFactory = self.factory
            searched_from = max(0, len(self._document) - len(CLOSE_TAG) + 1)
            self._document += data
            while True:
                end = self._document.find(CLOSE_TAG, searched_from)
                if end < 0:
                    break
                if end > factory.max_bytes:
                    # Whole in one read, but over the bound all the same.
                    self._oversized()
                    return
                document = bytes(self._document[:end])
                del self._document[: end + len(CLOSE_TAG)]
                searched_from = 0
                self._accept(document)
            if len(self._document) > factory.max_bytes:
                self._oversized()
        except Exception:
            self.factory.intake.failed("tcp", self.host)
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        # The peer half-closed (``nc -N``): what came is the whole document.
        self._finish()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.factory.connections -= 1
        self.setTimeout(None)
        if reason is None or reason.check(ConnectionDone):
            self._finish()
        elif self._document.strip() and not self._discarding:
            # A reset is not the peer's end of its document: a cut one must not replace the
            # instance's last good system information.
            self.factory.stats["tcp_documents_cut"] += 1
            self.factory.log.warn(
                "Discarded {size} bytes from {source}: the connection was reset before the "
                "document ended",
                size=len(self._document),
                source=self.host,
            )
            self._document = bytearray()

    def timeoutConnection(self) -> None:
        self.factory.stats["tcp_idle_timeouts"] += 1
        self.factory.log.info(
            "Closing idle TCP connection from {source} after {seconds} s",
            source=self.host,
            seconds=self.factory.idle_seconds,
        )
        # What came is not a finished document: a timeout is not the peer's end of it.
        self._document = bytearray()
        self.transport.abortConnection()

    def _finish(self) -> None:
        try:
            self._finish_document()
        except Exception:
            self.factory.intake.failed("tcp", self.host)

    def _finish_document(self) -> None:
        if self._discarding:
            return
        raw = bytes(self._document).strip()
        self._document = bytearray()
        if not raw:
            return
        if raw.startswith(OPEN_TAG):
            self.factory.stats["tcp_documents_unterminated"] += 1
            self.factory.log.warn(
                "Document from {source} ended without {tag}; kept as it came",
                source=self.host,
                tag=CLOSE_TAG.decode(),
            )
        self._accept(raw)

    def _accept(self, raw: bytes) -> None:
        raw = raw.strip()
        if raw.startswith(OPEN_TAG):
            raw = raw[len(OPEN_TAG) :].strip()
        if not raw:
            return
        self.factory.accept(self.host, raw)

    def _oversized(self) -> None:
        factory: SystemInfoFactory = self.factory
        self._discarding = True
        self._document = bytearray()
        factory.stats["tcp_documents_refused"] += 1
        factory.log.error(
            "Discarded a document from {source}: over tcp_max_bytes ({limit} bytes); "
            "the connection is closed. Raise tcp_max_bytes if such documents are expected.",
            source=self.host,
            limit=factory.max_bytes,
        )
        self.transport.abortConnection()


class SystemInfoStore:
    """System information on disk, a file per instance: it survives a restart, and the
    processes sharing a port (reuse_port) see what any of them took in."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, address: str) -> str:
        return os.path.join(self.directory, address.replace(":", "-").replace("%", "_") + ".json")

    def prepare(self) -> None:
        """Create the directory (0700) at start; StartupError unless only the server's user can
        write it."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StartupError(
                f"system_info_dir: cannot use {self.directory!r} ({e.strerror}); "
                "expected a directory the server's user can write"
            ) from None
        check_private_directory(self.directory, "system_info_dir")

    def save(self, address: str, info: SystemInfo) -> None:
        """Write a document in place of the instance's last one, atomically. Raises OSError."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = self._path(address)
        # A name nobody can guess, created exclusively (a planted link is never written
        # through), readable by the server's user only: documents describe the instance.
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"received_at": info.received_at, "text": info.text,
                           "format": info.format, "peer": info.peer}, f)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def load(self, address: str) -> SystemInfo | None:
        """The instance's document on disk, if any. Raises OSError or ValueError when unreadable,
        OSError too when it is a symbolic link or not a regular file."""
        try:
            kept = json.loads(read_regular(self._path(address)).decode("utf-8"))
        except FileNotFoundError:
            return None
        return SystemInfo(float(kept["received_at"]), str(kept["text"]), str(kept["format"]),
                          str(kept.get("peer", "")))


class _SharedPort(tcp.Port):
    def createInternetSocket(self):
        sock = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


def listen_documents(reactor, port: int, factory: ServerFactory, interface: str,
                     reuse_port: bool = False, backlog: int = 128):
    """Listen for documents over TCP; with reuse_port other processes may listen on the port."""
    if not reuse_port:
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = _SharedPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


class SystemInfoFactory(ServerFactory):
    """Builds a SystemInfoProtocol per allowed client, up to tcp_max_connections at once."""

    protocol = SystemInfoProtocol
    log = get_logger(__name__)
    noisy = False

    def __init__(self, intake: Intake, max_bytes: int, idle_seconds: float, max_connections: int,
                 store: SystemInfoStore | None = None) -> None:
        self.intake = intake
        self.store = store
        self.clock = intake.clock
        self.stats = intake.stats
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.max_connections = max_connections
        self.connections = 0

    def buildProtocol(self, addr):
        host = instance_address(addr.host)
        if not self.intake.admits(host, "TCP"):
            return None
        if self.connections >= self.max_connections:
            self.stats["tcp_connections_refused"] += 1
            self.intake.notice(
                "tcp-busy",
                "Refused TCP from {source}: tcp_max_connections ({limit}) clients are connected",
                source=host,
                limit=self.max_connections,
            )
            return None
        return super().buildProtocol(addr)

    def accept(self, host: str, raw: bytes) -> None:
        """Keep a finished document as the instance's latest system information."""
        info = make_system_info(raw, self.clock.seconds(), host)
        self.intake.registry.receive_system_info(host, info)
        if self.store is not None:
            try:
                self.store.save(host, info)
            except OSError:
                self.intake.failed("system_info_store", host)
        self.stats["tcp_documents_accepted"] += 1
        self.log.info(
            "System information from {source}: {size} bytes ({kind})",
            source=host,
            size=len(raw),
            kind=info.format,
        )
