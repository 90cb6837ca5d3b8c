"""Failure kinds are data: each real failure gives the reporter's last error its kind,
/status.json carries it as spool.last_error_kind, and the probe's advice goes by it."""

from __future__ import annotations

import json
from collections import Counter

from OpenSSL import SSL
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.trial import unittest
from zope.interface import implementer

from tempesta_ts import probe_status
from tempesta_ts.config import Config
from tempesta_ts.delivery import FAILURE_KINDS
from tempesta_ts.reporter import Reporter
from tempesta_ts.service import TroubleshootingService
from tests.https_server import (
    SupportResource,
    TrackingSite,
    listen,
    make_certificates,
    stop_loopback,
)
from tests.test_logs import FailingClient
from tests.test_metrics import ServerCase
from tests.test_probe import closed_port
from tests.test_reporter import (
    CLIENT,
    EPOCH,
    KEY,
    Answer,
    FakeSupport,
    ReporterTestCase,
    report,
)
from tests.waits import wait_until


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class NothingResolves:
    """A resolver that finds no address for any name, as getaddrinfo answers for a name that
    does not exist, without asking anyone: the test's DNS server would not be on loopback."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class WithoutDNS:
    """The real reactor, with NothingResolves as its name resolver."""

    def __init__(self, real) -> None:
        self._real = real
        self.nameResolver = NothingResolves()

    def installNameResolver(self, resolver):
        old, self.nameResolver = self.nameResolver, resolver
        return old

    def __getattr__(self, name):
        return getattr(self._real, name)


class _BadRequest(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()

    def connectionMade(self) -> None:
        self.factory.open_channels.add(self)

    def connectionLost(self, reason=None) -> None:
        self.factory.open_channels.discard(self)


class PlainHTTP(protocol.Factory):
    """A plain HTTP port: whatever comes, it answers 400 in clear text and closes."""

    protocol = _BadRequest
    noisy = False

    def __init__(self) -> None:
        self.open_channels: set = set()


class RealFailureTests(unittest.TestCase):
    """The real client, the real reactor, a real HTTPS server on loopback (or none)."""

    timeout = 20

    def setUp(self):
        self.certs = make_certificates(self.mktemp())
        self.spool_dir = self.mktemp()
        self.reporters: list[Reporter] = []
        self.servers: list = []
        self.addCleanup(self.stop_all)

    @defer.inlineCallbacks
    def stop_all(self):
        yield stop_loopback(self.reporters, self.servers)

    def serve(self, statuses=(), interface: str = "127.0.0.1") -> int:
        site = TrackingSite(SupportResource(statuses))
        listening = listen(reactor, site, self.certs, 0, interface)
        self.servers.append((site, listening))
        return listening.getHost().port

    def serve_plain_http(self) -> int:
        factory = PlainHTTP()
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.servers.append((factory, listening))
        return listening.getHost().port

    @defer.inlineCallbacks
    def failed(self, port: int, host: str = "127.0.0.1", clock=reactor, **settings) -> Reporter:
        """A reporter whose first attempt at delivering one report has failed."""
        config = Config(support_host=host, support_port=port, support_client_id=CLIENT,
                        support_api_key=KEY, spool_dir=self.spool_dir, **settings)
        rep = Reporter(config, clock, Counter(), backoff_base=30, connect_timeout=2,
                       response_timeout=5)
        rep.startService()
        self.reporters.append(rep)
        yield rep.submit(report(1))
        yield wait_until(lambda: rep.last_error is not None)
        return rep

    @defer.inlineCallbacks
    def test_an_untrusted_certificate_is_tls(self):
        rep = yield self.failed(self.serve())
        self.assertEqual(rep.last_error_kind, "tls")
        self.assertIn("certificate verify failed", rep.last_error)

    @defer.inlineCallbacks
    def test_a_certificate_for_another_address_is_tls(self):
        port = self.serve(interface="127.0.0.2")
        rep = yield self.failed(port, host="127.0.0.2", support_ca_file=self.certs.ca_file)
        self.assertEqual(rep.last_error_kind, "tls")
        self.assertIn("does not name 127.0.0.2", rep.last_error)

    @defer.inlineCallbacks
    def test_a_handshake_with_a_plain_http_port_is_tls(self):
        rep = yield self.failed(self.serve_plain_http(), support_ca_file=self.certs.ca_file)
        self.assertEqual(rep.last_error_kind, "tls")
        self.assertIn("TLS handshake with 127.0.0.1", rep.last_error)

    @defer.inlineCallbacks
    def test_401_is_credentials(self):
        rep = yield self.failed(self.serve([401]), support_ca_file=self.certs.ca_file)
        self.assertEqual(rep.last_error_kind, "credentials")
        self.assertIn("refused the credentials of client", rep.last_error)

    @defer.inlineCallbacks
    def test_a_closed_port_is_refused(self):
        port = closed_port()
        rep = yield self.failed(port, support_ca_file=self.certs.ca_file)
        self.assertEqual(rep.last_error_kind, "refused")
        self.assertEqual(rep.last_error, f"connection refused by 127.0.0.1:{port}")

    @defer.inlineCallbacks
    def test_a_name_that_does_not_resolve_is_dns(self):
        clock = WithoutDNS(reactor)
        rep = yield self.failed(443, host="support.invalid", clock=clock)
        self.assertEqual(rep.last_error_kind, "dns")
        self.assertEqual(rep.last_error, "cannot resolve support.invalid (DNS)")
        self.assertEqual(clock.nameResolver.asked, ["support.invalid"])

    @defer.inlineCallbacks
    def test_400_is_rejected(self):
        rep = yield self.failed(self.serve([400]), support_ca_file=self.certs.ca_file)
        self.assertEqual(rep.last_error_kind, "rejected")
        self.assertEqual(rep.state_of(report(1)["report_id"]), "rejected")

    @defer.inlineCallbacks
    def test_503_is_server_error(self):
        rep = yield self.failed(self.serve([503]), support_ca_file=self.certs.ca_file)
        self.assertEqual(rep.last_error_kind, "server_error")
        self.assertEqual(rep.last_error, "HTTP 503 from the Support Server")


class ClockFailureTests(ReporterTestCase):
    """Kinds whose failures a Clock or a canned answer shows as well as a socket."""

    def test_no_answer_within_the_response_timeout_is_timeout(self):
        rep = self.reporter(FakeSupport([Answer(hang=True)]))
        self.submit(rep, report(1))
        self.advance(29.9)
        self.assertIsNone(rep.last_error_kind)
        self.advance(0.1)
        self.assertEqual(rep.last_error_kind, "timeout")
        self.assertIn("within 30 s (timeout)", rep.last_error)

    def test_busy_answers_are_server_error_and_unexpected_ones_other(self):
        for status, kind in ((500, "server_error"), (429, "server_error"), (408, "server_error"),
                             (404, "other"), (301, "other")):
            self.spool_dir = self.mktemp()
            rep = self.reporter(FakeSupport([Answer(status)]))
            self.submit(rep, report(status))
            self.assertEqual(rep.last_error_kind, kind, status)
            rep.stopService()

    def test_a_delivery_clears_the_kind(self):
        rep = self.reporter(FakeSupport([Answer(503)]))
        self.submit(rep, report(1))
        self.assertEqual(rep.last_error_kind, "server_error")
        self.advance(1)
        self.assertIsNone(rep.last_error)
        self.assertIsNone(rep.last_error_kind)


class StatusJSONTests(ServerCase):
    """spool.last_error_kind beside spool.last_error on /status.json."""

    def spool(self, svc) -> dict:
        response, body = self.get(svc, "/status.json")
        return json.loads(body)["spool"]

    def test_the_kind_of_the_last_failure_is_shown_and_cleared(self):
        svc = self.make(FakeSupport([Answer(status=401)]), cooldown_seconds=300.0)
        self.assertIsNone(self.spool(svc)["last_error_kind"])
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        self.advance(1.0)
        spool = self.spool(svc)
        self.assertEqual(spool["last_error_kind"], "credentials")
        self.assertIn("HTTP 401", spool["last_error"])
        self.advance(300.0)  # the retry is accepted
        spool = self.spool(svc)
        self.assertIsNone(spool["last_error"])
        self.assertIsNone(spool["last_error_kind"])

    def test_stand_alone_has_no_kind(self):
        svc = self.make()
        self.assertIsNone(self.spool(svc)["last_error_kind"])



#: For each kind: a way to fail (an error the client raises, or the Support Server's answer),
#: and what the probe's advice must say.
HOW_EACH_KIND_FAILS = {
    "tls": (SSL.Error([("SSL routines", "", "certificate verify failed")]), "support_ca_file"),
    "credentials": (Answer(401), "check support_client_id and the API key"),
    "refused": (error.ConnectionRefusedError(), "support_host:support_port"),
    "timeout": (Answer(hang=True), "firewall"),
    "dns": (error.DNSLookupError("support.test"), "does not resolve"),
    "rejected": (Answer(422), "spool_dir/rejected/"),
    "server_error": (Answer(503), "retries with backoff"),
    "other": (Answer(404), "support_path"),
}


class ProbeAdviceTests(ServerCase):
    """The probe reads the kind on /status.json and gives the advice for it."""

    def failing(self, how) -> TroubleshootingService:
        """A server on a Clock whose first report fails as `how` says; its status read back."""
        if isinstance(how, Answer):
            support = FakeSupport()
            support.default = how  # every attempt, the retries too
            svc = self.make(support)
        else:
            self.clock = task.Clock()
            self.clock.advance(EPOCH)
            config = Config(host="127.0.0.1", port=0, spool_dir=self.mktemp(),
                            settle_seconds=1.0, support_host="support.test",
                            support_client_id=CLIENT, support_api_key=KEY)
            svc = TroubleshootingService(config, self.clock, http_client=FailingClient(how))
            svc.reporter.startService()
            self.addCleanup(svc.reporter.stopService)
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        self.advance(1.0)  # settled, spooled, the first attempt made
        self.advance(30.0)  # a request that hangs has timed out
        return svc

    def status(self, svc) -> dict:
        response, body = self.get(svc, "/status.json")
        return json.loads(body)

    def test_each_kind_gets_its_advice(self):
        self.assertEqual(set(HOW_EACH_KIND_FAILS), set(FAILURE_KINDS))
        for kind, (how, fix) in HOW_EACH_KIND_FAILS.items():
            self.stub = None
            svc = self.failing(how)
            last_error, read = probe_status.delivery_failure(self.status(svc))
            self.assertIsNotNone(last_error, kind)
            self.assertEqual(read, kind)
            self.assertIn(fix, probe_status.advice_for(read), kind)
            # What retrying cannot fix stops the probe at once.
            self.assertEqual(probe_status.is_lasting(read), kind in ("tls", "credentials"), kind)

    def test_a_status_without_a_kind_gets_the_general_advice(self):
        # A server older than last_error_kind: the probe does not guess from the wording.
        doc = {"spool": {"last_error": "connection refused by h:443"}}
        self.assertEqual(probe_status.delivery_failure(doc),
                         ("connection refused by h:443", "other"))
        self.assertIn("see the server's log", probe_status.advice_for("other"))
