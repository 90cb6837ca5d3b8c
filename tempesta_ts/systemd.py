"""systemd's notify protocol (``Type=notify``): READY=1, STOPPING=1 and WATCHDOG=1.

Each message is one datagram to ``$NOTIFY_SOCKET``, as sd_notify(3) sends it: a path, or an
abstract socket when the name starts with '@'. No libsystemd needed.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping

from twisted.application import service
from twisted.internet import task

from tempesta_ts.log import get_logger


def notify_address(name: str | None) -> str | bytes | None:
    """The socket address that ``$NOTIFY_SOCKET`` names, or None if none we can use."""
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return name
    # systemd 254+ may also give "vsock:CID:PORT" to a virtual machine; not ours to serve.
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None if not asked."""
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class SystemdNotifier(service.Service):
    """Tells systemd when the server is ready, that it is alive, and when it stops.

    STOPPING=1 goes out when the reactor begins to shut down or the service is stopped,
    whichever comes first. Does nothing without ``$NOTIFY_SOCKET``; sending never raises.
    """

    log = get_logger(__name__)

    def __init__(
        self,
        reactor,
        environ: Mapping[str, str],
        status: Callable[[], str],
        pid: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.status = status
        self.pid = os.getpid() if pid is None else pid
        # Read, not unset as sd_notify(unset_environment=1) would: the server starts no
        # processes, and with NotifyAccess=main systemd would not listen to them anyway.
        self.socket_name = environ.get("NOTIFY_SOCKET")
        self.address = notify_address(self.socket_name)
        self.watchdog_interval = watchdog_interval(environ, self.pid)
        self.sent = 0
        self.failures = 0
        self._watchdog: task.LoopingCall | None = None
        self._shutdown = None
        self._pending = None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens for our notifications."""
        return self.address is not None

    def startService(self) -> None:
        super().startService()
        if self.socket_name and self.address is None:
            self.log.warn(
                "NOTIFY_SOCKET={name!r} is not a socket path; systemd is not told of readiness",
                name=self.socket_name,
            )
        if not self.enabled:
            return
        # The listeners are bound already (privilegedStartService comes first); waiting for
        # the reactor means twistd's SIGTERM handler is in place once READY=1 is out, and a
        # turn more lets the other start-up callbacks (the "listening" line) go first.
        self.reactor.callWhenRunning(self._running)
        # twistd begins stopping at the reactor's shutdown; a parent that stops its children
        # in an order of its own need not know of this one.
        self._shutdown = self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _running(self) -> None:
        if self.running:
            self._pending = self.reactor.callLater(0, self._ready)

    def _ready(self) -> None:
        self._pending = None
        self.notify(f"READY=1\nSTATUS={self.status()}\nMAINPID={self.pid}")
        if self.watchdog_interval is not None:
            # Pinged from the reactor's loop, so a stuck loop lets systemd's watchdog fire.
            self._watchdog = task.LoopingCall(self.notify, "WATCHDOG=1")
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.watchdog_interval, now=False)

    def _stopping(self) -> None:
        # A trigger that fires is spent; removing it again is deprecated.
        self._shutdown = None
        self.stopService()

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()
        if self._shutdown is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown)
            self._shutdown = None
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        if self.enabled:
            self.notify("STOPPING=1\nSTATUS=stopping")

    def notify(self, message: str) -> bool:
        """Send one message; False if it could not be sent (the first failure is logged)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # A full queue at systemd's end must not stall the reactor.
                sock.setblocking(False)
                sock.sendto(message.encode("utf-8"), self.address)
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                self.log.warn(
                    "Cannot notify systemd at {name} ({reason}); further failures are only "
                    "counted",
                    name=self.socket_name,
                    reason=e.strerror or str(e),
                )
            return False
        self.sent += 1
        return True
