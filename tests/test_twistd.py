"""``twistd tempesta-ts`` as an operator runs it: start, refuse bad settings, stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket

from twisted.internet import defer, error
from twisted.trial import unittest

from tests.processes import STARTED, TWISTD, spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "tap.conf.example")
SECONDS = 30



def busy_udp_port(case) -> int:
    """A port of 127.0.0.1 whose UDP side is taken (until the case's cleanup) and whose TCP
    side was free a moment ago: the server's TCP listener, started first, must not be the one
    refused (an ephemeral port of some TCP client may hold the number a bare UDP bind took)."""
    for _ in range(100):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            busy.bind(("127.0.0.1", port))
        except OSError:
            busy.close()
            continue
        finally:
            probe.close()
        case.addCleanup(busy.close)
        return port
    raise RuntimeError("no port of 127.0.0.1 free for both TCP and UDP in 100 tries")

class TwistdTests(unittest.TestCase):
    """The real twistd process."""

    def twistd(self, *argv: str):
        # --metrics-port 0: a server of the operator's on the default port must not matter.
        return spawn(self, "twistd", [*TWISTD, "-n", "--pidfile=", "tempesta-ts", "--metrics-port", "0", *argv])

    @defer.inlineCallbacks
    def refused(self, *argv: str) -> defer.Deferred:
        """Run twistd expecting it to refuse to start: its output lines."""
        child = self.twistd(*argv)
        reason = yield child.ended(SECONDS)
        self.assertIsInstance(reason, error.ProcessTerminated, child.tail())
        self.assertNotEqual(reason.exitCode, 0)
        self.assertNotIn(STARTED, "\n".join(child.lines))
        self.assertNotIn("Traceback", "\n".join(child.lines))
        return child.lines

    def config_file(self, content: dict) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(content, f)
        return path

    @defer.inlineCallbacks
    def test_example_config_starts_and_sigterm_stops_within_a_second(self):
        spool = os.path.abspath(self.mktemp())
        child = self.twistd("--config", EXAMPLE, "--port", "0", "--spool-dir", spool)
        line = yield child.line_containing(STARTED, SECONDS)
        self.assertIn("UDP receive buffer", line)
        self.assertIn("stand-alone", line)
        child.transport.signalProcess("TERM")
        reason = yield child.ended(1.0)
        # twistd ends by the signal that stopped it, which systemd counts as a clean stop.
        self.assertEqual(reason.signal, signal.SIGTERM, child.tail())
        self.assertIn("Server Shut Down.", "\n".join(child.lines))

    @defer.inlineCallbacks
    def test_start_up_line_shows_whatever_the_log_level(self):
        spool = os.path.abspath(self.mktemp())
        child = self.twistd("--port", "0", "--host", "127.0.0.1", "--spool-dir", spool, "--log-level", "error")
        yield child.line_containing(STARTED, SECONDS)
        child.transport.signalProcess("TERM")
        yield child.ended(SECONDS)

    @defer.inlineCallbacks
    def test_unknown_key_stops_the_start_naming_the_closest_key(self):
        lines = yield self.refused("--config", self.config_file({"prot": 5555}))
        self.assertIn("unknown key 'prot'; did you mean 'port'?", lines[-1])

    @defer.inlineCallbacks
    def test_bad_value_stops_the_start_without_showing_the_api_key(self):
        path = self.config_file({"support_api_key": "TOPSECRET", "port": 70000})
        lines = yield self.refused("--config", path)
        self.assertIn("key 'port': 70000 is not valid; expected an integer from 0 to 65535", lines[-1])
        self.assertNotIn("TOPSECRET", "\n".join(lines))

    @defer.inlineCallbacks
    def test_missing_config_file_stops_the_start(self):
        lines = yield self.refused("--config-file", "/nonexistent/tap.conf")
        self.assertIn("'/nonexistent/tap.conf': cannot read it (No such file or directory)", lines[-1])

    @defer.inlineCallbacks
    def test_port_in_use_stops_the_start_with_one_line(self):
        port = str(busy_udp_port(self))
        lines = yield self.refused("--host", "127.0.0.1", "--port", port, "--spool-dir", self.mktemp())
        failures = [l for l in lines if "cannot listen" in l]
        self.assertEqual(len(failures), 1, "\n".join(lines))
        self.assertIn(f"cannot listen on UDP 127.0.0.1:{port}: the port is in use", failures[0])

    @defer.inlineCallbacks
    def test_a_group_writable_spool_dir_stops_the_start_with_one_line(self):
        spool = os.path.abspath(self.mktemp())
        os.makedirs(spool)
        os.chmod(spool, 0o775)
        lines = yield self.refused("--host", "127.0.0.1", "--port", "0", "--spool-dir", spool)
        self.assertIn(
            f"tempesta-ts: spool_dir: {spool!r} is writable by its group (mode 0775), who could "
            "plant or replace the files the server reads back; expected only the server's user "
            f"to write it: chmod go-w {spool}",
            lines[-1],
        )

    @defer.inlineCallbacks
    def test_help_lists_every_option(self):
        child = self.twistd("--help")
        yield child.ended(SECONDS)
        text = "\n".join(child.lines)
        for flag in ("--host", "--port", "--support-host", "--support-port", "--support-client-id",
                     "--support-api-key", "--config-file", "--skip-ssl-verification"):
            self.assertIn(flag, text)

    @defer.inlineCallbacks
    def test_version_prints_tempesta_ts_version(self):
        from tempesta_ts import __version__
        child = spawn(self, "twistd", [*TWISTD, "tempesta-ts", "--version"])
        reason = yield child.ended(SECONDS)
        self.assertIsInstance(reason, error.ProcessDone, child.tail())
        self.assertIn(f"tempesta-ts {__version__}", child.lines[0])

    @defer.inlineCallbacks
    def test_a_config_error_is_one_line_without_the_usage_banner(self):
        lines = yield self.refused("--config", EXAMPLE, "--config-file", "/etc/other.json")
        text = "\n".join(l for l in lines if l)
        self.assertNotIn("Usage: twistd", text)
        self.assertEqual(
            text,
            "tempesta-ts: --config/--config-file: two config files given "
            f"({EXAMPLE!r} and '/etc/other.json'); expected one",
        )

    @defer.inlineCallbacks
    def test_start_up_line_names_the_config_file(self):
        spool = os.path.abspath(self.mktemp())
        child = self.twistd("--config", EXAMPLE, "--port", "0", "--spool-dir", spool)
        line = yield child.line_containing(STARTED, SECONDS)
        self.assertTrue(line.endswith(f"; config {EXAMPLE}"), line)
        child.transport.signalProcess("TERM")
        yield child.ended(SECONDS)

    @defer.inlineCallbacks
    def test_daemonised_port_in_use_error_is_whole(self):
        port = str(busy_udp_port(self))
        run = os.path.abspath(self.mktemp())
        os.makedirs(run)
        child = spawn(self, "twistd", [
            *TWISTD, f"--pidfile={run}/pid", f"--logfile={run}/log", "tempesta-ts", "--metrics-port", "0",
            "--host", "127.0.0.1", "--port", port, "--spool-dir", os.path.join(run, "spool"),
        ])
        reason = yield child.ended(SECONDS)
        self.assertIsInstance(reason, error.ProcessTerminated, child.tail())
        whole = [l for l in child.lines if l.startswith("tempesta-ts: cannot listen")]
        self.assertEqual(len(whole), 1, child.tail())
        self.assertIn(f"cannot listen on UDP 127.0.0.1:{port}: the port is in use", whole[0])
        self.assertFalse(whole[0].endswith("'"), whole[0])
