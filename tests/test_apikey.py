"""The API key: warned of where other local users can read it, never shown anywhere."""

from __future__ import annotations

import json
import os
import re
import socket
from unittest import mock

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts import config, tap
from tests.processes import STARTED, TWISTD, spawn

KEY = "sekrit-4f1d9c"
SECONDS = 30


class ExposureTests(unittest.TestCase):
    """Options.warnings after parsing, as makeService logs them."""

    def write(self, content: str | dict, mode: int) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        os.chmod(path, mode)
        return path

    def warnings(self, *argv: str) -> list[str]:
        options = tap.Options()
        options.parseOptions(["--spool-dir", self.mktemp(), *argv])
        for warning in options.warnings:
            self.assertNotIn(KEY, warning)
        return options.warnings

    def test_clickhouse_password_on_the_command_line_or_readable_by_all(self):
        (warning,) = self.warnings("--clickhouse-password", KEY)
        self.assertIn("The ClickHouse password is given with --clickhouse-password, where any local "
                      "user can read it", warning)
        path = self.write({"clickhouse_password": KEY}, 0o644)
        (warning,) = self.warnings("--config", path)
        self.assertIn(f"Config file {path!r} holds clickhouse_password and any local user can read it "
                      "(mode 0644); chmod 600 it, or move the ClickHouse password to "
                      "clickhouse_password_file (mode 600)", warning)
        path = self.write(KEY, 0o604)
        (warning,) = self.warnings("--clickhouse-password-file", path)
        self.assertIn(f"clickhouse_password_file {path!r} can be read by any local user", warning)

    def test_world_readable_config_file_holding_the_key(self):
        path = self.write({"support_api_key": KEY}, 0o644)
        [warning] = self.warnings("--config", path)
        self.assertIn(f"Config file {path!r} holds support_api_key and any local user can read it "
                      "(mode 0644); chmod 600 it", warning)
        self.assertIn("LoadCredential", warning)

    def test_private_config_file_or_one_without_the_key_is_fine(self):
        self.assertEqual(self.warnings("--config", self.write({"support_api_key": KEY}, 0o600)), [])
        self.assertEqual(self.warnings("--config", self.write({"support_api_key": KEY}, 0o640)), [])
        self.assertEqual(self.warnings("--config", self.write({"port": 5556}, 0o644)), [])
        self.assertEqual(self.warnings("--config", self.write({"support_api_key": None}, 0o644)), [])

    def test_key_on_the_command_line(self):
        [warning] = self.warnings("--support-api-key", KEY)
        self.assertIn("--support-api-key, where any local user can read it (ps, /proc)", warning)

    def test_world_readable_key_file(self):
        path = self.write(KEY + "\n", 0o604)
        [warning] = self.warnings("--support-api-key-file", path)
        self.assertIn(f"support_api_key_file {path!r} can be read by any local user (mode 0604); "
                      "chmod 600 it", warning)
        self.assertEqual(self.warnings("--support-api-key-file", self.write(KEY, 0o600)), [])

    def test_environment_is_fine(self):
        options = tap.Options()
        with mock.patch.dict(os.environ, {config.API_KEY_ENV: KEY}):
            options.parseOptions(["--spool-dir", self.mktemp()])
        self.assertEqual(options.config.support_api_key, KEY)
        self.assertEqual(options.warnings, [])

    def test_every_exposure_is_named(self):
        path = self.write({"support_api_key": KEY,
                           "support_api_key_file": self.write(KEY, 0o644)}, 0o644)
        self.assertEqual(len(self.warnings("--config", path, "--support-api-key", KEY)), 3)

    def test_make_service_logs_them_as_warnings_without_the_key(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = tap.Options()
        options.parseOptions(["--port", "0", "--spool-dir", self.mktemp(), "--support-api-key", KEY])
        tap.makeService(options, environ={})
        warned = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warned), 1)
        self.assertIn("--support-api-key", formatEvent(warned[0]))
        for event in events:
            self.assertNotIn(KEY, formatEvent(event) or "")
            self.assertNotIn(KEY, repr(event))


class TwistdKeyTests(unittest.TestCase):
    """The real twistd process: the warnings show once logging begins; the key never does."""

    @defer.inlineCallbacks
    def test_warnings_in_the_output_and_the_key_nowhere(self):
        conf = os.path.abspath(self.mktemp())
        with open(conf, "w") as f:
            json.dump({"support_api_key": KEY + "-file", "support_host": "127.0.0.1",
                       "support_port": 9, "support_client_id": "client-1",
                       "settle_seconds": 0}, f)
        os.chmod(conf, 0o644)
        child = spawn(self, "twistd", [
            *TWISTD, "-n", "--pidfile=", "tempesta-ts", "--config", conf, "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "0", "--spool-dir", os.path.abspath(self.mktemp()),
            "--log-level", "debug", "--support-api-key", KEY,
        ])
        line = yield child.line_containing(STARTED, SECONDS)
        port = int(re.search(r"UDP and TCP 127\.0\.0\.1:(\d+)", line).group(1))
        # A report that cannot be delivered (nothing listens on port 9) is logged too.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"[   12.345678] WARNING test message\n", ("127.0.0.1", port))
        yield child.line_containing("not delivered", SECONDS)
        child.transport.signalProcess("TERM")
        yield child.ended(5)
        text = "\n".join(child.lines)
        self.assertIn("Server Shut Down.", text)
        self.assertIn("[tempesta_ts.tap#warn] The API key is given with --support-api-key", text)
        self.assertIn(f"[tempesta_ts.tap#warn] Config file {conf!r} holds support_api_key", text)
        self.assertIn("as client client-1", text)
        self.assertNotIn(KEY, text)
