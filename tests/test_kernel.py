"""End to end: a real Linux kernel, booted under QEMU, sends its netconsole log to the server.

Needs root, ``ip netns``, qemu-system-x86_64 and a Debian kernel package (fetched once into
$TS_KERNEL_CACHE by tests/kernel/kernel-netconsole.sh --prepare); skips without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import uuid

from twisted.internet import defer, error
from twisted.trial import unittest

from tests.processes import STARTED, TWISTD, Child, run, spawn

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel", "kernel-netconsole.sh")
CACHE = os.environ.get("TS_KERNEL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tempesta-ts-kernel"
)
#: The namespace is the test's own, so a fixed port cannot collide.
PORT = 6666
#: What the server logs for every kernel line at log level debug: "{instance} {text}".
KERNEL_LINE = re.compile(r"\[tempesta_ts\.service\.TroubleshootingService#debug\] (\S+) (.*)$")
#: The hello scenario's lines after the boot line, in the order the guest writes them.
HELLO = ("test-message", "WARNING test message", "after the warning")

SERVER_START_SECONDS = 30
GUEST_SECONDS = 260  # the script bounds QEMU itself to 240 s
SERVER_STOP_SECONDS = 30
PREPARE_SECONDS = 240


def local_reports(spool: str) -> list[dict]:
    """The reports a stand-alone server wrote, oldest first."""
    local = os.path.join(spool, "local")
    names = sorted(os.listdir(local)) if os.path.isdir(local) else []
    reports = []
    for name in names:
        with open(os.path.join(local, name), encoding="utf-8") as f:
            reports.append(json.load(f))
    return reports


class KernelNetconsoleTests(unittest.TestCase):
    """A Debian 6.1 kernel's netconsole, plain and extended, through the running server."""

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to make a network namespace and run QEMU in it")
        if shutil.which("ip") is None:
            raise unittest.SkipTest("the ip command (iproute2) is not installed")
        out, err, code = yield run(shutil.which("ip"), "netns", "list")
        if code != 0:
            raise unittest.SkipTest(f"ip netns is unavailable: {err.decode(errors='replace').strip()}")
        if shutil.which("qemu-system-x86_64") is None:
            raise unittest.SkipTest("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
        yield self._prepare_kernel()

    @defer.inlineCallbacks
    def _prepare_kernel(self):
        """Fetch the kernel package (and cpio, busybox) once, or skip if that cannot be done."""
        ready = (
            os.path.isdir(os.path.join(CACHE, "root", "boot"))
            and shutil.which("cpio") is not None
            and os.access("/bin/busybox", os.X_OK)
        )
        if ready:
            return
        if shutil.which("apt-get") is None:
            raise unittest.SkipTest(f"no kernel under {CACHE} and no apt-get to fetch one")
        prepare = self._spawn("prepare", ["/bin/bash", SCRIPT, "--prepare"])
        try:
            reason = yield prepare.ended(PREPARE_SECONDS)
        except defer.TimeoutError:
            raise unittest.SkipTest(f"fetching the kernel took over {PREPARE_SECONDS} s") from None
        if not isinstance(reason, error.ProcessDone):
            raise unittest.SkipTest(f"cannot fetch the kernel or its tools: {prepare.tail(5)}")

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> Child:
        return spawn(self, name, argv, env)

    @defer.inlineCallbacks
    def _namespace(self):
        """A fresh network namespace with lo up, deleted (its processes killed) in cleanup."""
        name = f"tstest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        ip = shutil.which("ip")
        out, err, code = yield run(ip, "netns", "add", name)
        if code != 0:
            raise unittest.SkipTest(f"cannot make a network namespace: {err.decode(errors='replace').strip()}")
        self.addCleanup(self._delete_namespace, ip, name)
        out, err, code = yield run(ip, "netns", "exec", name, "ip", "link", "set", "lo", "up")
        self.assertEqual(code, 0, f"ip link set lo up in {name}: {err!r}")
        return name

    @defer.inlineCallbacks
    def _delete_namespace(self, ip: str, name: str):
        # Whatever still runs in it (QEMU of a script that was killed) was started by this test.
        out, _, _ = yield run(ip, "netns", "pids", name)
        for pid in out.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        yield run(ip, "netns", "del", name)

    @defer.inlineCallbacks
    def _boot(self, scenario: str, *script_flags: str):
        """Run a scenario against a stand-alone server in a fresh namespace.

        Returns the server's output lines, the guest console's path and the reports written.
        """
        namespace = yield self._namespace()
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        server = self._spawn("server", [
            shutil.which("ip"), "netns", "exec", namespace, *TWISTD, "-n", "--pidfile=",
            "tempesta-ts", "--host", "127.0.0.1", "--port", str(PORT), "--log-level", "debug",
            "--spool-dir", os.path.join(tmp, "spool"), "--settle-seconds", "1",
        ])
        yield server.line_containing(STARTED, SERVER_START_SECONDS)
        console = os.path.join(tmp, "console.log")
        guest = self._spawn("kernel-netconsole.sh", [
            "/bin/bash", SCRIPT, "--netns", namespace, "--port", str(PORT),
            "--scenario", scenario, "--console", console, *script_flags,
        ], env={"TS_KERNEL_NO_INSTALL": "1"})
        reason = yield guest.ended(GUEST_SECONDS)
        self.assertIsInstance(reason, error.ProcessDone, f"the script failed:\n{guest.tail()}")
        self.assertTrue(server.running, f"the server ended early:\n{server.tail()}")
        server.transport.signalProcess("TERM")
        reason = yield server.ended(SERVER_STOP_SECONDS)
        # twistd (Twisted 24.7+) ends by re-raising the signal that stopped it.
        stopped = reason.exitCode == 0 or reason.signal == signal.SIGTERM
        self.assertTrue(stopped, f"the server did not stop cleanly ({reason}):\n{server.tail()}")
        return server.lines, console, local_reports(os.path.join(tmp, "spool"))

    def assert_hello_logged_once_in_order(self, output: list[str], console: str) -> None:
        """The boot line and the three hello lines, once each, in order, from one instance."""
        logged = [m.groups() for m in map(KERNEL_LINE.search, output) if m]
        shown = "\n".join(output[-60:])
        self.assertTrue(logged, f"the server logged no kernel line (guest console: {console}):\n{shown}")
        instances = sorted({instance for instance, _ in logged})
        self.assertEqual(len(instances), 1, f"lines came from several instances: {instances}")
        texts = [text for _, text in logged]
        wanted = [("Linux version ...", lambda t: t.startswith("Linux version "))]
        wanted += [(line, lambda t, line=line: t == line) for line in HELLO]
        positions = []
        for label, matches in wanted:
            hits = [i for i, text in enumerate(texts) if matches(text)]
            self.assertEqual(len(hits), 1, f"{label!r} logged {len(hits)} times, not once:\n{shown}")
            positions.append(hits[0])
        self.assertEqual(positions, sorted(positions), f"out of order: {positions}")

    @defer.inlineCallbacks
    def test_plain_netconsole_lines_reach_the_buffers_once_in_order(self):
        output, console, reports = yield self._boot("hello")
        self.assert_hello_logged_once_in_order(output, console)
        self.assert_one_report(reports, "warning", "WARNING test message")

    @defer.inlineCallbacks
    def test_extended_netconsole_lines_reach_the_buffers_once_in_order(self):
        output, console, reports = yield self._boot("hello", "--extended")
        self.assert_hello_logged_once_in_order(output, console)
        self.assert_one_report(reports, "warning", "WARNING test message")

    @defer.inlineCallbacks
    def test_kernel_panic_gives_one_report_with_the_whole_trace(self):
        output, console, reports = yield self._boot("crash")
        report = self.assert_one_report(reports, "crash", "Kernel panic - not syncing: sysrq triggered crash")
        incident = report["incidents"][0]
        self.assertEqual(incident["title"], "kernel panic: sysrq triggered crash")
        self.assertIn("sysrq_handle_crash", [f["function"] for f in incident["frames"]])
        self.assertRegex(incident["fingerprint"], r"\A[0-9a-f]{16}\Z")
        texts = [entry["text"] for entry in report["log"]]
        self.assertTrue(texts[0].startswith("Linux version "), texts[:3])
        self.assertIn("Call Trace:", [t.strip() for t in texts])
        # With panic=1 the trace ends with the reboot notice: nothing after the panic is cut.
        self.assertTrue(any(t.startswith("Rebooting in") for t in texts), texts[-5:])

    def assert_one_report(self, reports: list[dict], kind: str, line: str) -> dict:
        """Exactly one report, whose incidents include `line` and start with `kind`."""
        self.assertEqual(len(reports), 1, [r["incidents"] for r in reports])
        (report,) = reports
        self.assertEqual(report["incidents"][0]["kind"], kind, report["incidents"])
        self.assertIn(line, [i["line"] for i in report["incidents"]])
        self.assertTrue(all(i["title"] for i in report["incidents"]), report["incidents"])
        return report
