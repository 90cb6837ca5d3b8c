"""A Support Server stand-in that misbehaves on demand, over real loopback sockets.

One TCP port; what it does is `StandIn.mode`, read when a connection comes (``stall_tls``) or
a request is whole (the rest), so that a test can make it misbehave, then recover:

- ``answer``: 200 and a JSON body; ``status``: `StandIn.status` and a JSON body;
- ``not_json``: 200 with an HTML body that is no JSON;
- ``hang``: reads the request, never answers;
- ``trickle``: answers 200, one byte each `StandIn.interval` seconds, headers included;
- ``trickle_body``: the status line and headers at once, then the body a byte at a time;
- ``hangup``: a status line cut in the middle, then closes;
- ``hangup_body``: 200 and headers announcing 100 bytes, 10 of them, then closes;
- ``stall_tls``: accepts and never speaks TLS (the client's handshake waits forever).

tests/https_server.py has the well-behaved server built on twisted.web.
"""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from tests.https_server import Certificates, server_tls_options
from tests.waits import wait_until

MODES = ("answer", "status", "not_json", "hang", "trickle", "trickle_body", "hangup",
         "hangup_body", "stall_tls")

JSON_BODY = b'{"status": "accepted"}'


def response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """A whole HTTP/1.1 answer that keeps the connection open."""
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, content_type, len(body)) + body)


class _Silent(protocol.Protocol):
    """Takes the client's TLS handshake and says nothing, ever."""

    def connectionMade(self) -> None:
        self.factory.opened(self)

    def connectionLost(self, reason=None) -> None:
        self.factory.closed(self)


class _HTTP(protocol.Protocol):
    """Reads requests (Content-Length bodies, one after another) and answers as the mode says."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.timer = None
        self.standin = self.factory.standin
        self.standin.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.standin.received(head, rest[:length])
            self.answer()

    def answer(self) -> None:
        mode = self.standin.mode
        if mode == "answer":
            self.transport.write(response(200, JSON_BODY))
        elif mode == "status":
            self.transport.write(response(self.standin.status, b'{"error": "test"}'))
        elif mode == "not_json":
            self.transport.write(response(200, b"<html>accepted, sort of", b"text/html"))
        elif mode == "trickle":
            self.trickle(response(200, JSON_BODY))
        elif mode == "trickle_body":
            whole = response(200, b"{" + b" " * 1000 + b"}")
            cut = whole.index(b"\r\n\r\n") + 4
            self.transport.write(whole[:cut])
            self.trickle(whole[cut:])
        elif mode == "hangup":
            self.transport.write(b"HTTP/1.1 20")
            self.transport.loseConnection()
        elif mode == "hangup_body":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            self.transport.loseConnection()
        # hang: nothing, ever.

    def trickle(self, rest: bytes) -> None:
        if not rest or self.transport is None or not self.connected:
            return
        self.transport.write(rest[:1])
        self.timer = self.standin.reactor.callLater(self.standin.interval, self.trickle, rest[1:])

    def connectionLost(self, reason=None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.standin.closed(self)


class StandIn(protocol.Factory):
    """The stand-in's listening factory: plain TCP, TLS with the test certificates on top
    unless the mode is stall_tls. Requests received are in `requests` as (head, body)."""

    noisy = False

    def __init__(self, reactor, certificates: Certificates, mode: str = "answer") -> None:
        assert mode in MODES, mode
        self.reactor = reactor
        self.mode = mode
        self.status = 503
        self.interval = 0.1
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.open: set = set()
        self.port = None
        http = protocol.Factory.forProtocol(_HTTP)
        http.standin = self
        http.noisy = False
        self._tls = TLSMemoryBIOFactory(server_tls_options(certificates), False, http)
        self._tls.noisy = False

    def buildProtocol(self, addr):
        self.connections += 1
        if self.mode == "stall_tls":
            silent = _Silent()
            silent.factory = self
            return silent
        return self._tls.buildProtocol(addr)

    def opened(self, proto) -> None:
        self.open.add(proto)

    def closed(self, proto) -> None:
        self.open.discard(proto)

    def received(self, head: bytes, body: bytes) -> None:
        self.requests.append((head, body))

    def keys(self) -> list[bytes]:
        """The Idempotency-Key of each request received."""
        found = []
        for head, _ in self.requests:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"idempotency-key":
                    found.append(value.strip())
        return found

    def listen(self, interface: str = "127.0.0.1") -> int:
        """Listen on a free port of `interface`; the port."""
        self.port = self.reactor.listenTCP(0, self, interface=interface)
        return self.port.getHost().port

    @defer.inlineCallbacks
    def stop(self):
        """Stop listening, drop every connection, and wait until they are gone."""
        if self.port is not None:
            yield self.port.stopListening()
        for proto in list(self.open):
            if proto.transport is not None:
                proto.transport.abortConnection()
        yield wait_until(lambda: not self.open)
