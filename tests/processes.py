"""Child processes for tests that run the real server: output lines, bounded waits."""

from __future__ import annotations

import os
import socket
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue

#: twistd, not ``python -m twisted`` (twist): twist never calls privilegedStartService, where
#: the server binds, and filters below its own --log-level (info).
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
#: The checkout whose code the tests run.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What the start-up summary says once the server listens.
STARTED = "listening on UDP and TCP"


class ChildEnded(Exception):
    """The child process ended before printing what was waited for."""


class Child(protocol.ProcessProtocol):
    """A child process's output as lines; Deferreds for a line and for its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.reason = None
        self._partial: dict[int, bytes] = {}
        self._line_waiters: list[tuple[str, defer.Deferred]] = []
        self._end_waiters: list[defer.Deferred] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *complete, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        for raw in complete:
            self._add(raw.decode("utf-8", "replace"))

    def _add(self, line: str) -> None:
        self.lines.append(line)
        for waiter in list(self._line_waiters):
            if waiter[0] in line:
                self._line_waiters.remove(waiter)
                waiter[1].callback(line)

    def processEnded(self, reason) -> None:
        for rest in self._partial.values():
            if rest:
                self._add(rest.decode("utf-8", "replace"))
        self.reason = reason.value
        waiters, self._line_waiters = self._line_waiters, []
        for needle, d in waiters:
            d.errback(ChildEnded(f"{self.name} ended before printing {needle!r}:\n{self.tail()}"))
        ends, self._end_waiters = self._end_waiters, []
        for d in ends:
            d.callback(self.reason)

    @property
    def running(self) -> bool:
        return self.reason is None

    def line_containing(self, needle: str, seconds: float) -> defer.Deferred:
        """Fires with the first line containing ``needle``; bounded by ``seconds``."""
        for line in self.lines:
            if needle in line:
                return defer.succeed(line)
        if not self.running:
            return defer.fail(ChildEnded(f"{self.name} ended without {needle!r}:\n{self.tail()}"))
        d = defer.Deferred(lambda d: self._line_waiters.remove((needle, d)))
        self._line_waiters.append((needle, d))
        return d.addTimeout(seconds, reactor)

    def ended(self, seconds: float) -> defer.Deferred:
        """Fires with the exit reason (ProcessDone or ProcessTerminated); bounded."""
        if not self.running:
            return defer.succeed(self.reason)
        d = defer.Deferred(lambda d: self._end_waiters.remove(d))
        self._end_waiters.append(d)
        return d.addTimeout(seconds, reactor)

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])


def run(*argv: str) -> defer.Deferred:
    """(out, err, code) of a short command."""
    return getProcessOutputAndValue(argv[0], argv[1:], env=os.environ)


#: How long a killed child may take to be reaped.
KILL_SECONDS = 10


def spawn(case, name: str, argv: list[str], env: dict | None = None) -> Child:
    """Start a child for a test case; the case's cleanup kills it if it still runs."""
    child = Child(name)
    # The child runs the code under test, not whatever version is installed.
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    environ = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **(env or {}))
    reactor.spawnProcess(child, argv[0], argv, env=environ, path=os.getcwd())

    def stop():
        if not child.running:
            return None
        child.transport.signalProcess("KILL")
        return child.ended(KILL_SECONDS)

    case.addCleanup(stop)
    return child


@defer.inlineCallbacks
def warning_settling(case, child: Child, seconds: float):
    """Once the twistd child listens, send it a kernel WARNING over UDP (loopback) and wait
    until the report it opens settles."""
    line = yield child.line_containing(STARTED, seconds)
    port = int(line.split("listening on UDP and TCP 127.0.0.1:")[1].split(";")[0].split()[0])
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    case.addCleanup(sender.close)
    sender.sendto(b"WARNING: CPU: 0 PID: 7 at net/core/dev.c:1 f+0x1/0x2\n", ("127.0.0.1", port))
    yield child.line_containing("reporting after", seconds)
