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
import sys
import tempfile
from contextlib import suppress
from dataclasses import replace

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from tempesta_ts.access import instance_address
from tempesta_ts.buffers import Instance, SystemInfo
from tempesta_ts.errors import StartupError
from tempesta_ts.files import check_private_directory, read_regular
from tempesta_ts.intake import Intake
from tempesta_ts.log import get_logger
from tempesta_ts.netconsole import decode_text

OPEN_TAG = b"<sys-info>"
CLOSE_TAG = b"</sys-info>"


def make_system_info(raw: bytes, received_at: float, peer: str) -> SystemInfo:
    """A document as kept: its text, and whether it looks like JSON.

    The text is never parsed: it is only passed on, and parsing an untrusted document builds a
    tree many times its size (30 MiB of nested lists took 770 MiB) or overflows the stack
    (200,000 nested lists), on the one thread that serves everything.
    """
    text = decode_text(raw)
    braces = text[:1] + text[-1:]
    kind = "json" if braces in ("{}", "[]") else "text"
    return SystemInfo(received_at=received_at, text=text, format=kind, peer=peer)


def held_size(info: SystemInfo | None) -> int:
    """Bytes of memory a document's text takes (none when only the disk holds it)."""
    return 0 if info is None or info.on_disk else sys.getsizeof(info.text)


def on_disk(info: SystemInfo) -> SystemInfo:
    """What memory keeps of a document kept only in system_info_dir: all but its text."""
    return replace(info, text="", stored_size=info.size)


@implementer(IHalfCloseableProtocol)
class SystemInfoProtocol(LineReceiver, TimeoutMixin):
    """Receives documents from one connection.

    LineReceiver's line mode does not fit a document of many MiB with no newline (its
    delimiter is CRLF and MAX_LENGTH drops the connection at 16 KiB; re-splitting a growing
    buffer is quadratic), so the protocol runs in raw mode and looks for the closing tag only
    in the new bytes. A document grows in memory while system_info_memory_max_bytes has room,
    then in a nameless file in system_info_dir (or is refused without one).
    """

    def connectionMade(self) -> None:
        factory: SystemInfoFactory = self.factory
        self.host = instance_address(self.transport.getPeer().host)
        self.callLater = factory.clock.callLater
        self._document = bytearray()
        #: How much of _document is counted in factory.in_progress.
        self._counted = 0
        #: The document so far once memory had no room for it, and its length and last bytes
        #: (a closing tag may start in them).
        self._spill = None
        self._spilled = 0
        self._tail = b""
        self._discarding = False
        factory.connected(self.host)
        self.setRawMode()
        self.setTimeout(factory.idle_seconds)
        # Idleness alone lets a client that sends a byte now and then hold its slot for ever.
        self._deadline = factory.clock.callLater(factory.document_seconds, self._document_timeout)

    def rawDataReceived(self, data: bytes) -> None:
        try:
            self.resetTimeout()
            while data and not self._discarding:
                if self._spill is None and not self.factory.has_room(len(data)):
                    self._move_to_disk()
                elif self._spill is not None:
                    data = self._spill_data(data)
                else:
                    data = self._take(data)
        except OSError:
            self.factory.intake.failed("system_info_store", self.host)
            self._drop()
            self.transport.abortConnection()
        except Exception:
            self.factory.intake.failed("tcp", self.host)
            self._drop()
            self.transport.abortConnection()

    def _take(self, data: bytes) -> bytes:
        factory: SystemInfoFactory = self.factory
        searched_from = max(0, len(self._document) - len(CLOSE_TAG) + 1)
        self._document += data
        self._count()
        while True:
            end = self._document.find(CLOSE_TAG, searched_from)
            if end < 0:
                break
            if end > factory.max_bytes:
                # Whole in one read, but over the bound all the same.
                self._oversized()
                return b""
            document = bytes(self._document[:end])
            del self._document[: end + len(CLOSE_TAG)]
            self._count()
            searched_from = 0
            self._accept(document)
        if len(self._document) > factory.max_bytes:
            self._oversized()
        return b""

    def _move_to_disk(self) -> None:
        factory: SystemInfoFactory = self.factory
        if factory.store is None:
            factory.over_memory(self.host, len(self._document))
            self._drop()
            self.transport.abortConnection()
            return
        os.makedirs(factory.store.directory, mode=0o700, exist_ok=True)
        # Nameless (O_TMPFILE): nothing is left behind by a crash.
        spill = tempfile.TemporaryFile(dir=factory.store.directory)
        try:
            spill.write(self._document)
        except OSError:
            spill.close()
            raise
        self._spill = spill
        self._spilled = len(self._document)
        self._tail = bytes(self._document[-(len(CLOSE_TAG) - 1) :])
        self._document = bytearray()
        self._count()

    def _spill_data(self, data: bytes) -> bytes:
        """Write what belongs to the document on disk; return what follows its end, if it ended."""
        window = self._tail + data
        end = window.find(CLOSE_TAG)
        if end < 0:
            self._write(data)
            self._tail = window[-(len(CLOSE_TAG) - 1) :]
            return b""
        # `end` counts from the start of the tail, which is on disk already.
        cut = end - len(self._tail)
        if cut >= 0:
            self._write(data[:cut])
        else:
            self._spilled += cut
            self._spill.truncate(self._spilled)
        if self._discarding:
            return b""
        self._accept(self._read_spill())
        return data[cut + len(CLOSE_TAG) :]

    def _write(self, data: bytes) -> None:
        if self._spilled + len(data) > self.factory.max_bytes:
            self._oversized()
            return
        self._spill.write(data)
        self._spilled += len(data)

    def _read_spill(self) -> bytes:
        spill, self._spill = self._spill, None
        self._spilled = 0
        self._tail = b""
        try:
            spill.seek(0)
            return spill.read()
        finally:
            spill.close()

    def _count(self) -> None:
        size = len(self._document)
        self.factory.in_progress += size - self._counted
        self._counted = size

    def _drop(self) -> None:
        """Let go of what came (memory and disk) and of what comes."""
        self._discarding = True
        self._document = bytearray()
        self._count()
        if self._spill is not None:
            with suppress(OSError):
                self._spill.close()
            self._spill = None
        self._spilled = 0

    def readConnectionLost(self) -> None:
        # The peer half-closed (``nc -N``): what came is the whole document.
        self._finish()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.factory.disconnected(self.host)
        self.setTimeout(None)
        if self._deadline.active():
            self._deadline.cancel()
        if reason is None or reason.check(ConnectionDone):
            self._finish()
        elif (self._spilled or self._document.strip()) and not self._discarding:
            # A reset is not the peer's end of its document: a cut one must not replace the
            # instance's last good system information.
            self.factory.stats["tcp_documents_cut"] += 1
            self.factory.log.warn(
                "Discarded {size} bytes from {source}: the connection was reset before the "
                "document ended",
                size=len(self._document) + self._spilled,
                source=self.host,
            )
        self._drop()

    def timeoutConnection(self) -> None:
        self.factory.stats["tcp_idle_timeouts"] += 1
        self.factory.log.info(
            "Closing idle TCP connection from {source} after {seconds} s",
            source=self.host,
            seconds=self.factory.idle_seconds,
        )
        # What came is not a finished document: a timeout is not the peer's end of it.
        self._drop()
        self.transport.abortConnection()

    def _document_timeout(self) -> None:
        factory: SystemInfoFactory = self.factory
        try:
            factory.stats["tcp_document_timeouts"] += 1
            factory.intake.notice(
                "tcp-document-timeout",
                "Closed TCP connection from {source}: no document ended within "
                "tcp_document_seconds ({seconds} s); {size} bytes dropped",
                source=self.host,
                seconds=factory.document_seconds,
                size=len(self._document) + self._spilled,
            )
            # Like an idle timeout, not the peer's end of its document.
            self._drop()
            self.transport.abortConnection()
        except Exception:
            factory.intake.failed("tcp", self.host)

    def _finish(self) -> None:
        try:
            self._finish_document()
        except Exception:
            self.factory.intake.failed("tcp", self.host)

    def _finish_document(self) -> None:
        if self._discarding:
            return
        if self._spill is not None:
            raw = self._read_spill().strip()
        else:
            raw = bytes(self._document).strip()
            self._document = bytearray()
            self._count()
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
        factory: SystemInfoFactory = self.factory
        # The next document has its own tcp_document_seconds.
        if self._deadline.active():
            self._deadline.reset(factory.document_seconds)
        factory.accept(self.host, raw)

    def _oversized(self) -> None:
        factory: SystemInfoFactory = self.factory
        self._drop()
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
    """Builds a SystemInfoProtocol per allowed client, up to tcp_max_connections at once and
    tcp_max_connections_per_source from one address; keeps the documents within
    system_info_memory_max_bytes."""

    protocol = SystemInfoProtocol
    log = get_logger(__name__)
    noisy = False

    def __init__(self, intake: Intake, max_bytes: int, idle_seconds: float, max_connections: int,
                 store: SystemInfoStore | None = None, *, memory_max_bytes: int = 64 * 1024 * 1024,
                 document_seconds: float = 60.0, max_connections_per_source: int = 4) -> None:
        self.intake = intake
        self.store = store
        self.clock = intake.clock
        self.stats = intake.stats
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.document_seconds = document_seconds
        self.memory_max_bytes = memory_max_bytes
        self.connections = 0
        self.per_source: dict[str, int] = {}
        #: Bytes of documents under way held in memory, all connections.
        self.in_progress = 0
        # Memory the instances' documents took when last counted. Only this factory adds to
        # it (`accept`, `hold`); instances dropped make it too high, never too low.
        self._held = 0

    def buildProtocol(self, addr):
        host = instance_address(addr.host)
        if not self.intake.admits(host, "TCP"):
            return None
        if self.per_source.get(host, 0) >= self.max_connections_per_source:
            # One address must not take every slot (a client sending a byte now and then).
            self.stats["tcp_source_connections_refused"] += 1
            self.intake.notice(
                ("tcp-source-busy", host),
                "Refused TCP from {source}: it has tcp_max_connections_per_source ({limit}) "
                "connections open",
                source=host,
                limit=self.max_connections_per_source,
            )
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

    def connected(self, host: str) -> None:
        """Count a connection made."""
        self.connections += 1
        self.per_source[host] = self.per_source.get(host, 0) + 1

    def disconnected(self, host: str) -> None:
        """Count a connection gone."""
        self.connections -= 1
        left = self.per_source.get(host, 0) - 1
        if left > 0:
            self.per_source[host] = left
        else:
            self.per_source.pop(host, None)

    @property
    def memory_bytes(self) -> int:
        """Memory system information takes now: the instances' documents and those under way."""
        return self._held_bytes() + self.in_progress

    def _held_bytes(self) -> int:
        return sum(held_size(instance.system_info) for instance in self.intake.registry)

    def has_room(self, size: int) -> bool:
        """Whether memory may hold `size` more bytes of a document under way."""
        if self._held + self.in_progress + size <= self.memory_max_bytes:
            return True
        self._held = self._held_bytes()
        return self._held + self.in_progress + size <= self.memory_max_bytes

    def _fits(self, host: str, info: SystemInfo) -> bool:
        instance = self.intake.registry.get(host)
        replaced = held_size(instance.system_info) if instance is not None else 0
        self._held = self._held_bytes()
        return self._held - replaced + self.in_progress + held_size(info) <= self.memory_max_bytes

    def hold(self, instance: Instance, info: SystemInfo) -> None:
        """Make a document on disk the instance's system information, its text in memory if
        there is room."""
        instance.system_info = info if self._fits(instance.address, info) else on_disk(info)
        self._held = self._held_bytes()

    def over_memory(self, host: str, size: int) -> None:
        """Count and notice a document refused for want of memory and of system_info_dir."""
        self.stats["tcp_documents_over_memory"] += 1
        self.intake.notice(
            "tcp-over-memory",
            "Refused a document from {source} after {size} bytes: system information in memory "
            "reached system_info_memory_max_bytes ({limit} bytes). Set system_info_dir to keep "
            "such documents on disk, or raise the bound",
            source=host,
            size=size,
            limit=self.memory_max_bytes,
        )

    def accept(self, host: str, raw: bytes) -> None:
        """Keep a finished document as the instance's latest system information: in memory
        if there is room, else only in system_info_dir (refused without one)."""
        info = make_system_info(raw, self.clock.seconds(), host)
        if self._fits(host, info):
            kept = info
        elif self.store is not None:
            kept = on_disk(info)
        else:
            self.over_memory(host, len(raw))
            return
        if self.store is not None:
            try:
                self.store.save(host, info)
            except OSError:
                self.intake.failed("system_info_store", host)
                if kept is not info:
                    # Neither memory nor disk holds it: not accepted.
                    return
        self.intake.registry.receive_system_info(host, kept)
        self._held = self._held_bytes()
        self.stats["tcp_documents_accepted"] += 1
        if kept is not info:
            self.stats["system_info_kept_on_disk"] += 1
        self.log.info(
            "System information from {source}: {size} bytes ({kind}){where}",
            source=host,
            size=len(raw),
            kind=info.format,
            where="" if kept is info else ", kept on disk only (system_info_memory_max_bytes)",
        )
