"""tempesta-ts-probe against the real server on loopback: what it confirms, how it fails."""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import socket
import sys

from twisted.internet import defer, protocol, reactor, task
from twisted.python import usage
from twisted.trial import unittest

from tempesta_ts import probe, probe_messages, probe_options, probe_status
from tempesta_ts.config import Config
from tempesta_ts.incidents import Rules, signature
from tempesta_ts.service import TroubleshootingService
from tests.https_server import SupportResource, TrackingSite, listen, make_certificates
from tests.processes import ROOT, spawn
from tests.waits import wait_until
from tests.live import start_live

#: Polls of /status.json in the tests: fast, the server is on loopback.
POLL = 0.02


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def options(*argv: str) -> probe_options.Options:
    """Parsed probe options."""
    parsed = probe_options.Options()
    parsed.parseOptions(list(argv))
    return parsed


class Silent(protocol.Protocol):
    """Accepts a connection and never answers."""


class ProbeCase(unittest.TestCase):
    """A real server on loopback ports and the probe run in-process against it."""

    timeout = 60

    def start(self, **settings) -> TroubleshootingService:
        settings.setdefault("settle_seconds", 0.1)
        settings.setdefault("host", "127.0.0.1")
        config = Config(port=0, spool_dir=self.mktemp(), **settings)
        return start_live(self, config)

    def argv(self, svc, *extra: str, timeout: float = 5.0) -> list[str]:
        host, port = svc.listeners.address if svc.listeners.udp_port else self.address
        return [
            "--host", host, "--port", str(port), "--status-url", f"{svc.web.url}/status.json",
            "--timeout", str(timeout), "--settle", "0.1", *extra,
        ]

    @defer.inlineCallbacks
    def probe(self, *argv: str):
        """(exit status, output lines) of one in-process run."""
        lines: list[str] = []
        started = reactor.seconds()
        code = yield probe.Probe(reactor, options(*argv), lines.append, poll_interval=POLL).run()
        self.elapsed = reactor.seconds() - started
        return code, lines

    def instance(self, svc, address: str = "127.0.0.1"):
        return svc.registry.get(address)


class ConfirmationTests(ProbeCase):
    """Datagrams and the document are confirmed through /status.json."""

    @defer.inlineCallbacks
    def test_plain_extended_and_document_are_confirmed(self):
        svc = self.start()
        code, lines = yield self.probe(*self.argv(svc))
        self.assertEqual(code, 0, "\n".join(lines))
        output = "\n".join(lines)
        self.assertIn("sent a plain netconsole line and an extended one (seq ", output)
        self.assertIn("sent a system information document (", output)
        self.assertIn("server took in 2 datagrams and 1 document from 127.0.0.1", output)
        self.assertTrue(lines[-1].startswith("OK: plain and extended netconsole, system "
                                             "information document"), lines[-1])
        instance = self.instance(svc)
        texts = [line.text for line in instance.buffer]
        self.assertEqual(len(texts), 2)
        self.assertRegex(texts[0], r"\Atempesta-ts-probe [g-z]{10} plain\Z")
        self.assertRegex(texts[1], r"\Atempesta-ts-probe [g-z]{10} extended\Z")
        self.assertEqual(json.loads(instance.system_info.text)["tool"], "tempesta-ts-probe")
        self.assertEqual(svc.stats["incidents_warning"], 0)

    @defer.inlineCallbacks
    def test_repeated_runs_count_no_loss_and_no_duplicate(self):
        svc = self.start()
        for _ in range(3):
            code, lines = yield self.probe(*self.argv(svc))
            self.assertEqual(code, 0, "\n".join(lines))
        instance = self.instance(svc)
        self.assertEqual(len(instance.buffer), 6)
        self.assertEqual(instance.lost_messages, 0)
        self.assertEqual(svc.stats["duplicate_messages"], 0)

    @defer.inlineCallbacks
    def test_ipv6(self):
        try:
            check = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            check.bind(("::1", 0))
            check.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback here") from None
        svc = self.start(host="::1")
        code, lines = yield self.probe(*self.argv(svc))
        self.assertEqual(code, 0, "\n".join(lines))
        self.assertIn("server took in 2 datagrams and 1 document from ::1", lines)
        self.assertEqual(len(self.instance(svc, "::1").buffer), 2)

    @defer.inlineCallbacks
    def test_plain_only(self):
        svc = self.start()
        code, lines = yield self.probe(*self.argv(svc, "--plain-only"))
        self.assertEqual(code, 0, "\n".join(lines))
        self.assertIn("server took in 1 datagram and 1 document from 127.0.0.1", lines)
        self.assertEqual([line.seq for line in self.instance(svc).buffer], [None])

    @defer.inlineCallbacks
    def test_extended_only(self):
        svc = self.start()
        code, lines = yield self.probe(*self.argv(svc, "--extended-only"))
        self.assertEqual(code, 0, "\n".join(lines))
        self.assertIn("sent an extended netconsole message (seq ", "\n".join(lines))
        (line,) = self.instance(svc).buffer
        self.assertEqual(line.seq, 0)


class IncidentTests(ProbeCase):
    """--incident follows the test warning's report to its end."""

    @defer.inlineCallbacks
    def test_stand_alone_report_is_written(self):
        svc = self.start()
        code, lines = yield self.probe(*self.argv(svc, "--incident"))
        output = "\n".join(lines)
        self.assertEqual(code, 0, output)
        self.assertIn("sent the test warning: WARNING test message from tempesta-ts-probe ", output)
        self.assertIn("incident detected (warning), report settling", output)
        self.assertRegex(output, r"report [0-9a-f]{32} written under the server's spool_dir/local/")
        self.assertIn("incident report", lines[-1])
        self.assertEqual(svc.stats["reports_written_local"], 1)
        local = os.path.join(svc.config.spool_dir, "local")
        (name,) = os.listdir(local)
        with open(os.path.join(local, name)) as f:
            report = json.load(f)
        self.assertEqual(report["incidents"][0]["kind"], "warning")
        self.assertIn("tempesta-ts-probe", report["incidents"][0]["line"])

    @defer.inlineCallbacks
    def test_extended_only_warning_counts_no_loss(self):
        svc = self.start()
        code, lines = yield self.probe(*self.argv(svc, "--incident", "--extended-only"))
        self.assertEqual(code, 0, "\n".join(lines))
        instance = self.instance(svc)
        first, warning = instance.buffer
        self.assertEqual(warning.seq, first.seq + 1)
        self.assertEqual(warning.level, 4)
        self.assertEqual(instance.lost_messages, 0)

    @defer.inlineCallbacks
    def test_a_second_run_within_the_cooldown_is_reported_again(self):
        svc = self.start(cooldown_seconds=300.0)
        for _ in range(2):
            code, lines = yield self.probe(*self.argv(svc, "--incident"))
            self.assertEqual(code, 0, "\n".join(lines))
        self.assertEqual(svc.stats["reports_written_local"], 2)
        self.assertEqual(svc.stats["incidents_suppressed"], 0)

    @defer.inlineCallbacks
    def test_refused_support_server_fails_with_the_reason_within_the_timeout(self):
        port = closed_port()
        svc = self.start(
            support_host="127.0.0.1", support_port=port, support_client_id="probe-test",
            support_api_key="k3y-of-the-test",
        )
        code, lines = yield self.probe(*self.argv(svc, "--incident", timeout=1.5))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn(f"pending: connection refused by 127.0.0.1:{port}, retrying", output)
        self.assertIn("problem: report ", output)
        self.assertIn(f"not delivered within 1.6 s: connection refused by 127.0.0.1:{port}",
                      output)
        self.assertIn("what to do: nothing accepts connections at support_host:support_port",
                      output)
        self.assertEqual(lines[-1], "FAILED: incident report (see above)")
        # Bounded by --timeout plus --settle, with a little slack for the last poll.
        self.assertLess(self.elapsed, 1.6 + 1.0)

    @defer.inlineCallbacks
    def support(self, statuses=()):
        """A real HTTPS Support Server on loopback; (certificates, resource, port)."""
        certificates = make_certificates(self.mktemp())
        resource = SupportResource(statuses)
        site = TrackingSite(resource)
        https = listen(reactor, site, certificates)

        @defer.inlineCallbacks
        def stop():
            yield https.stopListening()
            yield wait_until(lambda: not site.open_channels)

        self.addCleanup(stop)
        yield None
        return certificates, resource, https.getHost().port

    def support_settings(self, port: int, **more) -> dict:
        return dict(
            support_host="127.0.0.1", support_port=port, support_client_id="probe-test",
            support_api_key="k3y-of-the-test", **more,
        )

    @defer.inlineCallbacks
    def test_delivered_to_a_support_server(self):
        certificates, resource, port = yield self.support(statuses=[503])
        svc = self.start(**self.support_settings(port, support_ca_file=certificates.ca_file))
        # The first attempt gets a 503; the retry (within 1 s) is accepted.
        code, lines = yield self.probe(*self.argv(svc, "--incident", timeout=10))
        output = "\n".join(lines)
        self.assertEqual(code, 0, output)
        self.assertRegex(output, r"report [0-9a-f]{32} delivered to the Support Server")
        body = json.loads(resource.received[-1].body)
        self.assertIn("tempesta-ts-probe", body["incidents"][0]["line"])
        yield svc.stopService()

    @defer.inlineCallbacks
    def test_untrusted_certificate_fails_at_once_with_the_fix(self):
        _, _, port = yield self.support()
        # No support_ca_file: the test CA is not in the system trust store.
        svc = self.start(**self.support_settings(port))
        code, lines = yield self.probe(*self.argv(svc, "--incident", timeout=20))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn("TLS verification failed for 127.0.0.1", output)
        self.assertIn("what to do: the server does not trust the Support Server's certificate: "
                      "set support_ca_file", output)
        # It does not wait for the timeout: a retry cannot fix this.
        self.assertLess(self.elapsed, 10)
        yield svc.stopService()

    @defer.inlineCallbacks
    def test_refused_credentials(self):
        certificates, _, port = yield self.support(statuses=[401] * 5)
        svc = self.start(**self.support_settings(port, support_ca_file=certificates.ca_file))
        code, lines = yield self.probe(*self.argv(svc, "--incident", timeout=10))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn("HTTP 401: the Support Server refused the credentials of client probe-test",
                      output)
        self.assertIn("check support_client_id and the API key", output)
        self.assertNotIn("k3y-of-the-test", output)
        yield svc.stopService()

    @defer.inlineCallbacks
    def test_rejected_report(self):
        certificates, _, port = yield self.support(statuses=[422])
        svc = self.start(**self.support_settings(port, support_ca_file=certificates.ca_file))
        code, lines = yield self.probe(*self.argv(svc, "--incident", timeout=10))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertRegex(output, r"problem: report [0-9a-f]{32} rejected: HTTP 422")
        self.assertIn("spool_dir/rejected/", output)
        yield svc.stopService()

    @defer.inlineCallbacks
    def test_ignored_warning_is_explained(self):
        svc = self.start(ignore_patterns=("tempesta-ts-probe",))
        code, lines = yield self.probe(*self.argv(svc, "--incident", timeout=0.5))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn("took in the test warning but detected no incident", output)
        self.assertIn("ignore_patterns", output)


class FailureTests(ProbeCase):
    """What the probe says when something is wrong, always within its timeout."""

    @defer.inlineCallbacks
    def test_status_url_refused(self):
        svc = self.start()
        url = f"http://127.0.0.1:{closed_port()}/status.json"
        argv = self.argv(svc)
        argv[argv.index("--status-url") + 1] = url
        code, lines = yield self.probe(*argv)
        self.assertEqual(code, 1)
        self.assertIn(f"problem: cannot read the server's status at {url}: connection refused",
                      "\n".join(lines))
        self.assertIn("give --status-url", "\n".join(lines))
        self.assertEqual(lines[-1], "FAILED: server status (see above)")
        # Nothing is sent when the result cannot be confirmed.
        self.assertEqual(svc.stats["datagrams"], 0)

    @defer.inlineCallbacks
    def test_status_url_that_never_answers(self):
        svc = self.start()
        factory = protocol.Factory.forProtocol(Silent)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        argv = self.argv(svc, timeout=0.5)
        argv[argv.index("--status-url") + 1] = f"http://127.0.0.1:{port.getHost().port}/status.json"
        code, lines = yield self.probe(*argv)
        self.assertEqual(code, 1)
        self.assertIn(": no answer in time", "\n".join(lines))
        self.assertLess(self.elapsed, 5)

    @defer.inlineCallbacks
    def test_status_url_that_is_not_the_status(self):
        svc = self.start()
        argv = self.argv(svc)
        argv[argv.index("--status-url") + 1] = f"{svc.web.url}/nothing"
        code, lines = yield self.probe(*argv)
        self.assertEqual(code, 1)
        self.assertIn("answered HTTP 404, not the status document", "\n".join(lines))

    @defer.inlineCallbacks
    def test_server_not_listening(self):
        svc = self.start()
        self.address = svc.listeners.address
        # Once the start-up line is out: it names the listeners' port.
        yield task.deferLater(reactor, 0, lambda: None)
        yield svc.listeners.stopService()
        code, lines = yield self.probe(*self.argv(svc, timeout=2))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn("note: the status says the server's listeners are down", output)
        self.assertIn("was refused (ICMP port unreachable)", output)
        self.assertIn(f"TCP connection to 127.0.0.1:{self.address[1]} refused", output)
        self.assertEqual(
            lines[-1],
            "FAILED: plain and extended netconsole, system information document (see above)",
        )

    @defer.inlineCallbacks
    def test_datagrams_to_another_port_are_not_confirmed(self):
        svc = self.start()
        nowhere = closed_port(socket.SOCK_DGRAM)
        argv = self.argv(svc, timeout=1)
        argv[argv.index("--port") + 1] = str(nowhere)
        code, lines = yield self.probe(*argv)
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn(f"listens on port {svc.listeners.address[1]}, not {nowhere}", output)
        self.assertIn("problem: UDP to 127.0.0.1", output)
        self.assertEqual(svc.stats["datagrams"], 0)

    @defer.inlineCallbacks
    def test_source_not_allowed(self):
        svc = self.start(allowed_sources=(ipaddress.ip_network("10.0.0.0/8"),))
        code, lines = yield self.probe(*self.argv(svc, timeout=1))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn("the server refused this machine's address 127.0.0.1: it is not in "
                      "allowed_sources", output)
        self.assertIn("the server refused TCP from 127.0.0.1", output)

    @defer.inlineCallbacks
    def test_refuses_to_probe_from_an_instance(self):
        svc = self.start()
        kernel = protocol.DatagramProtocol()
        port = reactor.listenUDP(0, kernel, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        kernel.transport.write(b"6.1.0-tfw,6,1,0,-;booted\n", svc.listeners.address)
        yield wait_until(lambda: self.instance(svc) is not None)
        code, lines = yield self.probe(*self.argv(svc))
        output = "\n".join(lines)
        self.assertEqual(code, 1, output)
        self.assertIn("is an instance of the server, with kernel 6.1.0-tfw", output)
        self.assertEqual(lines[-1], "FAILED: source address (see above)")
        self.assertEqual(svc.stats["datagrams"], 1)
        self.assertIsNone(self.instance(svc).system_info)


class PartsTests(unittest.TestCase):
    """The pieces: sequence numbers, the nonce, advice, options."""

    def test_each_run_numbers_from_zero_as_a_boot_does(self):
        self.assertEqual(probe_messages.sequence_number(1e9), 0)

    def test_the_nonce_survives_the_signature(self):
        for _ in range(50):
            nonce = probe_messages.make_nonce()
            line = probe_messages.test_warning(nonce)
            self.assertIn(nonce, signature("warning", line))
            detection = Rules().detect(line)
            self.assertEqual((detection.kind, detection.rule), ("warning", "test-message"))

    def test_advice(self):
        # The failure (spool.last_error) -> (its kind, spool.last_error_kind; in the advice).
        cases = {
            "TLS verification failed for h: certificate verify failed (...)":
                ("tls", "support_ca_file"),
            "TLS verification failed for h: its certificate does not name h; ...":
                ("tls", "set support_host"),
            "HTTP 401: the Support Server refused the credentials of client c; ...":
                ("credentials", "API key"),
            "connection refused by h:443": ("refused", "support_host:support_port"),
            "cannot resolve h (DNS)": ("dns", "DNS"),
            "timeout connecting to h:443": ("timeout", "firewall"),
            "no answer from h:443 within 30 s (timeout)": ("timeout", "firewall"),
            "HTTP 503 from the Support Server": ("server_error", "retries with backoff"),
            "HTTP 404 from the Support Server": ("other", "support_path"),
            "HTTP 422: report r rejected": ("rejected", "spool_dir/rejected/"),
        }
        for error, (kind, expected) in cases.items():
            self.assertIn(expected, probe_status.advice_for(kind), error)
        self.assertTrue(probe_status.is_lasting("credentials"))  # HTTP 403
        self.assertFalse(probe_status.is_lasting("refused"))

    def test_usage_errors(self):
        for argv, message in [
            ([], "--host is required"),
            (["--host", "collector.example.net"], "--host: 'collector.example.net' is not an IP"),
            (["--host", "127.0.0.1", "--port", "70000"], "--port: 70000 is not a port number"),
            (["--host", "127.0.0.1", "--timeout", "0"], "--timeout: 0 is not between"),
            (["--host", "127.0.0.1", "--status-url", "ftp://x/"], "--status-url: 'ftp://x/'"),
            (["--host", "127.0.0.1", "--plain-only", "--extended-only"], "exclude each other"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                options(*argv)
            self.assertIn(message, str(caught.exception))

    def test_defaults(self):
        parsed = options("--host", "::1")
        self.assertEqual(parsed["host"], "::1")
        self.assertEqual(parsed["port"], 5555)
        self.assertEqual(parsed["status-url"], "http://127.0.0.1:9478/status.json")
        self.assertEqual(parsed["timeout"], 30.0)

    def test_console_script_entry(self):
        setup = configparser.ConfigParser()
        setup.read(os.path.join(ROOT, "setup.cfg"))
        scripts = setup["options.entry_points"]["console_scripts"].strip().splitlines()
        self.assertIn("tempesta-ts-probe = tempesta_ts.probe:main", scripts)


class CommandLineTests(ProbeCase):
    """The real command: python -m tempesta_ts probe, and the console script's function."""

    @defer.inlineCallbacks
    def run_command(self, *argv: str):
        child = spawn(self, "probe", [sys.executable, *argv])
        reason = yield child.ended(30)
        return reason.exitCode, child.lines

    @defer.inlineCallbacks
    def test_help(self):
        code, lines = yield self.run_command("-m", "tempesta_ts", "probe", "--help")
        self.assertEqual(code, 0)
        self.assertIn("Usage: python -m tempesta_ts probe --host ADDRESS [options]", lines)
        self.assertTrue(any("--incident" in line for line in lines))

    @defer.inlineCallbacks
    def test_usage_error_exits_2(self):
        code, lines = yield self.run_command("-m", "tempesta_ts", "probe", "--port", "x")
        self.assertEqual(code, 2)
        self.assertIn("python -m tempesta_ts probe: --port: 'x' is not a port number", lines)
        code, lines = yield self.run_command("-m", "tempesta_ts", "nothing")
        self.assertEqual(code, 2)
        self.assertIn("python -m tempesta_ts: unknown command 'nothing'", lines)

    @defer.inlineCallbacks
    def test_probe_command_against_the_server(self):
        svc = self.start()
        code, lines = yield self.run_command("-m", "tempesta_ts", "probe", *self.argv(svc))
        self.assertEqual(code, 0, "\n".join(lines))
        self.assertTrue(lines[-1].startswith("OK: "), lines)

    @defer.inlineCallbacks
    def test_console_script_function_fails_with_1(self):
        url = f"http://127.0.0.1:{closed_port()}/status.json"
        code, lines = yield self.run_command(
            "-c", "import sys; from tempesta_ts.probe import main; main()",
            "--host", "127.0.0.1", "--status-url", url, "--timeout", "2",
        )
        self.assertEqual(code, 1, "\n".join(lines))
        self.assertEqual(lines[-1], "FAILED: server status (see above)")
