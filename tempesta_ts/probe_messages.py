"""What tempesta-ts-probe sends: its nonce, the netconsole datagrams, the system information
document and the test warning, and the sockets that send them."""

from __future__ import annotations

import json
import secrets

from twisted.internet import defer, protocol

from tempesta_ts import __version__
from tempesta_ts.probe_options import PROG

#: Nonce letters: none is a hexadecimal digit, so the incident signature never masks the nonce
#: (it masks numbers and runs of 8 hex digits) and every run's warning is a new incident.
NONCE_LETTERS = "ghjkmnpqrstvwxyz"
NONCE_LENGTH = 10


def make_nonce() -> str:
    """Letters that mark this run's messages and make its warning a new incident."""
    return "".join(secrets.choice(NONCE_LETTERS) for _ in range(NONCE_LENGTH))


def sequence_number(now: float) -> int:
    """The extended sequence number of a probe run's first message: 0.

    Each run numbers its messages as a booting kernel does, from 0, so the server sees the
    probe's own instance "reboot" and counts neither a loss (a number moving forward with
    time would count the time between two runs) nor a duplicate (an old number again).
    """
    return 0


def plain_datagram(text: str) -> bytes:
    """A plain netconsole line, with the console's time stamp."""
    return f"[    0.000000] {text}\n".encode("utf-8")


def extended_datagram(level: int, seq: int, text: str) -> bytes:
    """An extended netconsole message."""
    return f"{level},{seq},0,-;{text}\n".encode("utf-8")


def document(nonce: str, now: float) -> bytes:
    """The system information document, tagged as the vendor's script sends it."""
    body = {"probe": nonce, "tool": PROG, "version": __version__, "sent_at": round(now, 3)}
    return b"<sys-info>" + json.dumps(body).encode("ascii") + b"</sys-info>"


def test_warning(nonce: str) -> str:
    """The incident line: the vendor's test message, which the rules detect as a warning."""
    return f"WARNING test message from {PROG} {nonce}"

class Datagrams(protocol.DatagramProtocol):
    """A connected UDP socket: its local address is this machine's source toward the server."""

    noisy = False

    def __init__(self) -> None:
        #: Set when the server's host answered "port unreachable" (ICMP).
        self.refused = False

    def connectionRefused(self) -> None:
        self.refused = True


class DocumentSender(protocol.Protocol):
    """Writes one document, closes, and fires ``done`` once the connection is gone."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.local: str | None = None
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.local = self.transport.getHost().host
        self.transport.write(self.data)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.done.callback(None)
