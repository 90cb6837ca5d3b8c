"""systemd: the notify protocol against a real datagram socket, the unit file, the Docker probe."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts import tap
from tempesta_ts.systemd import SystemdNotifier, notify_address, watchdog_interval
from tests.processes import ROOT, STARTED, TWISTD, run, spawn
from tests.waits import wait_until

UNIT = os.path.join(ROOT, "contrib", "tempesta-ts.service")
REUSE_PORT_DROP_IN = os.path.join(ROOT, "contrib", "tempesta-ts@.service.d", "reuse-port.conf")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
SECONDS = 30


class NotifySocket:
    """systemd's end: a datagram socket that collects what the server sends."""

    def __init__(self, case: unittest.TestCase, abstract: bool = False) -> None:
        if abstract:
            self.name = f"@tempesta-ts-test-{os.getpid()}-{id(self)}"
            address: str | bytes = b"\0" + self.name[1:].encode()
        else:
            # Under /tmp: trial's temp paths can pass the 108 bytes a socket path may have.
            directory = tempfile.mkdtemp(prefix="ts-notify-", dir="/tmp")
            case.addCleanup(shutil.rmtree, directory, True)
            self.name = address = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.sock.close)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.received: list[str] = []

    def messages(self) -> list[str]:
        """Everything received so far."""
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode("utf-8"))
            except BlockingIOError:
                return self.received

    def fields(self, index: int) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.messages()[index].split("\n"))


class Starting:
    """A reactor that is not running yet: callWhenRunning waits for run(), and its shutdown
    is fired by hand; everything else goes to ``base`` (a Clock or the real reactor)."""

    def __init__(self, base) -> None:
        self.base = base
        self.hooks: list = []
        self.before_shutdown: list = []

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def callWhenRunning(self, f, *args, **kwargs) -> None:
        self.hooks.append((f, args, kwargs))

    def addSystemEventTrigger(self, phase: str, event: str, f, *args, **kwargs):
        assert (phase, event) == ("before", "shutdown"), (phase, event)
        handle = (f, args, kwargs)
        self.before_shutdown.append(handle)
        return handle

    def removeSystemEventTrigger(self, handle) -> None:
        self.before_shutdown.remove(handle)

    def run(self) -> None:
        hooks, self.hooks = self.hooks, []
        for f, args, kwargs in hooks:
            f(*args, **kwargs)

    def shut_down(self) -> defer.Deferred:
        """The 'before shutdown' triggers, as the reactor fires them when twistd stops."""
        triggers, self.before_shutdown = self.before_shutdown, []
        return gatherResults([maybeDeferred(f, *a, **kw) for f, a, kw in triggers])


def capture_log(case: unittest.TestCase) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class NotifierTests(unittest.TestCase):
    """READY=1, STOPPING=1 and WATCHDOG=1 on a Clock, to a real socket."""

    def notifier(self, environ: dict, pid: int = 4242) -> tuple[SystemdNotifier, Starting]:
        clock = Starting(task.Clock())
        notifier = SystemdNotifier(clock, environ, lambda: "listening on UDP and TCP h:1", pid)
        notifier.startService()
        self.addCleanup(notifier.stopService)
        return notifier, clock

    def test_ready_once_the_reactor_runs_then_stopping_on_stop(self):
        notify = NotifySocket(self)
        notifier, clock = self.notifier({"NOTIFY_SOCKET": notify.name})
        clock.base.advance(10)
        self.assertEqual(notify.messages(), [])
        clock.run()
        self.assertEqual(notify.messages(), [], "READY=1 waits for a turn of the running reactor")
        clock.base.advance(0)
        self.assertEqual(notify.messages(),
                         ["READY=1\nSTATUS=listening on UDP and TCP h:1\nMAINPID=4242"])
        notifier.stopService()
        self.assertEqual(notify.messages()[1:], ["STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(clock.before_shutdown, [])
        self.assertEqual((notifier.sent, notifier.failures), (2, 0))

    def test_stopping_as_the_reactor_begins_to_shut_down(self):
        notify = NotifySocket(self)
        notifier, clock = self.notifier({"NOTIFY_SOCKET": notify.name})
        clock.run()
        clock.base.advance(0)
        clock.shut_down()
        self.assertEqual(notify.messages()[1:], ["STOPPING=1\nSTATUS=stopping"])
        self.assertFalse(notifier.running)
        notifier.stopService()
        self.assertEqual(len(notify.messages()), 2, "STOPPING=1 is sent once")

    def test_stopped_before_the_reactor_runs_sends_no_ready(self):
        notify = NotifySocket(self)
        notifier, clock = self.notifier({"NOTIFY_SOCKET": notify.name})
        notifier.stopService()
        clock.run()
        clock.base.advance(1)
        self.assertEqual(notify.messages(), ["STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(clock.base.getDelayedCalls(), [])

    def test_abstract_socket(self):
        notify = NotifySocket(self, abstract=True)
        notifier, clock = self.notifier({"NOTIFY_SOCKET": notify.name})
        clock.run()
        clock.base.advance(0)
        self.assertEqual(notify.fields(0)["READY"], "1")

    def test_nothing_without_notify_socket(self):
        events = capture_log(self)
        notifier, clock = self.notifier({"WATCHDOG_USEC": "1000000"})
        self.assertFalse(notifier.enabled)
        clock.run()
        clock.base.advance(10)
        notifier.stopService()
        self.assertEqual((notifier.sent, notifier.failures), (0, 0))
        self.assertEqual((clock.hooks, clock.before_shutdown), ([], []))
        self.assertEqual(clock.base.getDelayedCalls(), [])
        self.assertEqual(events, [])

    def test_watchdog_at_half_the_interval_until_stopped(self):
        notify = NotifySocket(self)
        notifier, clock = self.notifier(
            {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "4242"}
        )
        self.assertEqual(notifier.watchdog_interval, 2.0)
        clock.run()
        clock.base.advance(0)
        clock.base.pump([1.0] * 5)
        self.assertEqual(notify.messages()[1:], ["WATCHDOG=1", "WATCHDOG=1"])
        notifier.stopService()
        clock.base.advance(10)
        self.assertEqual(notify.messages()[3:], ["STOPPING=1\nSTATUS=stopping"])

    def test_watchdog_of_another_process_or_malformed_is_ignored(self):
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, 2))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 2))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 2))
        self.assertIsNone(watchdog_interval({}, 2))

    def test_socket_names(self):
        self.assertEqual(notify_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(notify_address("@abstract"), b"\0abstract")
        self.assertIsNone(notify_address("vsock:2:1234"))
        self.assertIsNone(notify_address(""))

    def test_a_name_that_is_no_socket_path_is_said_once_and_ignored(self):
        events = capture_log(self)
        notifier, clock = self.notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
        self.assertFalse(notifier.enabled)
        self.assertEqual(clock.hooks, [])
        self.assertEqual([formatEvent(e) for e in events],
                         ["NOTIFY_SOCKET='vsock:2:1234' is not a socket path; "
                          "systemd is not told of readiness"])

    def test_failures_never_raise_are_counted_and_said_once(self):
        events = capture_log(self)
        gone = os.path.join(tempfile.mkdtemp(prefix="ts-notify-", dir="/tmp"), "gone")
        self.addCleanup(shutil.rmtree, os.path.dirname(gone), True)
        notifier, clock = self.notifier({"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "2000000"})
        clock.run()
        clock.base.advance(0)
        clock.base.pump([1.0] * 3)
        notifier.stopService()
        self.assertEqual((notifier.sent, notifier.failures), (0, 5))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "warn")
        self.assertIn(f"Cannot notify systemd at {gone} (", formatEvent(events[0]))


class AssembledTests(unittest.TestCase):
    """makeService's server over real sockets: READY=1 means it listens."""

    def assemble(self, notify) -> tuple:
        """The server as twistd makes it, told of the notify socket, on a reactor not yet run."""
        options = tap.Options()
        options.parseOptions(["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                              "--spool-dir", self.mktemp()])
        starting = Starting(reactor)
        return tap.makeService(options, starting, {"NOTIFY_SOCKET": notify.name}), starting

    @defer.inlineCallbacks
    def test_ready_after_binding_and_the_listening_line_stopping_before_closing(self):
        notify = NotifySocket(self)
        svc, starting = self.assemble(notify)
        self.addCleanup(svc.stopService)
        notified_at_the_line: list[bool] = []

        def observe(event):
            if STARTED in (formatEvent(event) or ""):
                notified_at_the_line.append(bool(notify.messages()))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        svc.privilegedStartService()
        svc.startService()
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(notify.messages(), [], "nothing before the reactor runs")
        starting.run()
        yield wait_until(notify.messages)
        self.assertEqual(notified_at_the_line, [False])
        port = svc.listeners.address[1]
        self.assertEqual(notify.fields(0), {
            "READY": "1", "STATUS": f"listening on UDP and TCP 127.0.0.1:{port}",
            "MAINPID": str(os.getpid()),
        })
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

        # As twistd stops: the reactor's 'before shutdown' triggers, then the service.
        yield starting.shut_down()
        self.assertEqual(notify.messages()[1:], ["STOPPING=1\nSTATUS=stopping"])
        self.assertIsNotNone(svc.listeners.udp_port, "STOPPING=1 comes before the listeners close")
        yield svc.stopService()
        self.assertEqual(len(notify.messages()), 2)

    @defer.inlineCallbacks
    def test_stopping_the_service_itself_says_stopping_first(self):
        notify = NotifySocket(self)
        svc, starting = self.assemble(notify)
        svc.privilegedStartService()
        svc.startService()
        starting.run()
        yield wait_until(notify.messages)
        yield svc.stopService()
        self.assertEqual(notify.messages()[1:], ["STOPPING=1\nSTATUS=stopping"])
        self.assertIsNone(svc.listeners.udp_port)

    def test_without_notify_socket_nothing_is_registered(self):
        options = tap.Options()
        options.parseOptions(["--port", "0", "--spool-dir", self.mktemp()])
        starting = Starting(reactor)
        tap.makeService(options, starting, {})
        self.assertEqual(starting.before_shutdown, [])


class TwistdNotifyTests(unittest.TestCase):
    """The real twistd process as systemd runs it."""

    @defer.inlineCallbacks
    def test_ready_after_listening_then_sigterm_gives_stopping(self):
        notify = NotifySocket(self)
        child = spawn(self, "twistd", [
            *TWISTD, "-n", "--pidfile=", "tempesta-ts", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--spool-dir", os.path.abspath(self.mktemp()),
        ], env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "200000"})
        yield wait_until(notify.messages, SECONDS)
        # Written to stdout before READY=1 was sent; the pipe may be read a moment later.
        line = yield child.line_containing(STARTED, 5)
        ready = notify.fields(0)
        port = re.search(r"UDP and TCP 127\.0\.0\.1:(\d+)", line).group(1)
        self.assertEqual(ready, {"READY": "1", "STATUS": f"listening on UDP and TCP 127.0.0.1:{port}",
                                 "MAINPID": str(child.transport.pid)})
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass
        yield wait_until(lambda: "WATCHDOG=1" in notify.messages(), 5)
        child.transport.signalProcess("TERM")
        reason = yield child.ended(5)
        self.assertEqual(reason.signal, signal.SIGTERM, child.tail())
        yield wait_until(lambda: notify.messages()[-1] == "STOPPING=1\nSTATUS=stopping", 5)
        self.assertEqual(notify.messages().count("STOPPING=1\nSTATUS=stopping"), 1)
        self.assertNotIn("Cannot notify systemd", child.tail())


class UnitFileTests(unittest.TestCase):
    """contrib/tempesta-ts.service as systemd reads it."""

    def setUp(self):
        if shutil.which("systemd-analyze") is None:
            raise unittest.SkipTest("systemd-analyze is not installed (Debian: systemd)")

    def unit_here(self) -> str:
        """The unit with ExecStart= pointing at an executable of this machine."""
        with open(UNIT) as f:
            text = f.read()
        self.assertIn("ExecStart=/usr/local/bin/twistd --nodaemon --pidfile= tempesta-ts", text)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "tempesta-ts.service")
        with open(path, "w") as f:
            f.write(text.replace("/usr/local/bin/twistd", shutil.which("twistd") or "/bin/true"))
        return path

    @defer.inlineCallbacks
    def test_systemd_analyze_verify_finds_nothing(self):
        out, err, code = yield run("systemd-analyze", "verify", self.unit_here())
        self.assertEqual((code, err.decode() + out.decode()), (0, ""))

    @defer.inlineCallbacks
    def test_the_reuse_port_template_verifies_with_its_drop_in(self):
        directory = os.path.dirname(self.unit_here())
        os.rename(os.path.join(directory, "tempesta-ts.service"), os.path.join(directory, "tempesta-ts@.service"))
        drop_ins = os.path.join(directory, "tempesta-ts@.service.d")
        os.makedirs(drop_ins)
        with open(REUSE_PORT_DROP_IN) as f:
            text = f.read()
        for flag in ("--reuse-port", "--spool-dir /var/lib/tempesta-ts/%i", "--metrics-port %i",
                     "--system-info-dir "):
            self.assertIn(flag, text)
        with open(os.path.join(drop_ins, "reuse-port.conf"), "w") as f:
            f.write(text.replace("/usr/local/bin/twistd", shutil.which("twistd") or "/bin/true"))
        out, err, code = yield run("systemd-analyze", "verify", os.path.join(directory, "tempesta-ts@9478.service"))
        self.assertEqual((code, err.decode() + out.decode()), (0, ""))

    @defer.inlineCallbacks
    def test_exposure_stays_low(self):
        out, err, code = yield run("systemd-analyze", "security", "--offline=true", "--threshold=20",
                                   "--no-pager", self.unit_here())
        if b"--offline" in err or b"--threshold" in err:
            raise unittest.SkipTest("systemd-analyze security --offline needs systemd 250")
        shown = (out + err).decode()
        self.assertEqual(code, 0, shown[-800:])
        self.assertRegex(shown, r"Overall exposure level for tempesta-ts\.service: [01]\.\d")

    def test_settings_the_server_relies_on(self):
        with open(UNIT) as f:
            settings = [line.strip() for line in f if re.match(r"\s*[A-Z]\w*=", line)]
        for expected in ("Type=notify", "NotifyAccess=main", "StateDirectory=tempesta-ts",
                         "LoadCredential=api-key:/etc/tempesta-ts/api-key",
                         "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"):
            self.assertIn(expected, settings)
        # cffi callbacks (pyOpenSSL, so every TLS connection) need writable executable memory.
        self.assertNotIn("MemoryDenyWriteExecute=yes", settings)


class DockerHealthcheckTests(unittest.TestCase):
    """The Dockerfile's HEALTHCHECK command against a running server's /healthz."""

    @defer.inlineCallbacks
    def probe(self, port: int):
        """The probe's exit status (0 healthy, 1 not)."""
        with open(DOCKERFILE) as f:
            text = f.read().replace("\\\n", " ")
        command = re.search(r"^HEALTHCHECK .*? CMD (.+)$", text, re.M).group(1)
        self.assertIn("http://127.0.0.1:9478/healthz", command)
        command = command.replace(":9478/", f":{port}/")
        out, err, code = yield run("sh", "-c", command)
        return code

    @defer.inlineCallbacks
    def test_healthy_while_listening_unhealthy_once_stopped(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        child = spawn(self, "twistd", [
            *TWISTD, "-n", "--pidfile=", "tempesta-ts", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", str(metrics_port), "--spool-dir", os.path.abspath(self.mktemp()),
        ])
        yield child.line_containing(STARTED, SECONDS)
        healthy = yield self.probe(metrics_port)
        self.assertEqual(healthy, 0)
        child.transport.signalProcess("TERM")
        yield child.ended(5)
        healthy = yield self.probe(metrics_port)
        self.assertEqual(healthy, 1)
