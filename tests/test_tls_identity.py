"""The Support Server's identity over real loopback TLS: the API key goes only to a server whose
certificate names support_host in its subjectAltName, signed by a trusted CA, in date."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections import Counter

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts.config import Config
from tempesta_ts.reporter import Reporter
from tests.https_server import (
    Certificates,
    SupportResource,
    TrackingChannel,
    TrackingSite,
    listen,
    stop_loopback,
)
from tests.test_reporter import CLIENT, KEY, report
from tests.waits import wait_until

HOUR = datetime.timedelta(hours=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A private CA that signs leaf certificates as a test needs them."""

    def __init__(self, directory: str, common_name: str = "tempesta-ts identity test CA") -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + 24 * HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = os.path.join(directory, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, label: str, common_name: str, names=(), expired: bool = False) -> Certificates:
        """A server certificate for `names` (DNS names or IP addresses; none: no subjectAltName)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (now - 48 * HOUR, now - 24 * HOUR) if expired else (now - HOUR, now + 24 * HOUR)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if names:
            alt = []
            for name in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        files = Certificates(
            ca_file=self.ca_file,
            server_cert_file=os.path.join(self.directory, f"{label}.pem"),
            server_key_file=os.path.join(self.directory, f"{label}-key.pem"),
        )
        with open(files.server_cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(files.server_key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return files


class RecordingChannel(TrackingChannel):
    """Keeps every byte of HTTP the server decrypts, so that a test sees whether any came."""

    def dataReceived(self, data: bytes) -> None:
        self.site.raw += data
        super().dataReceived(data)


class RecordingSite(TrackingSite):
    """A TrackingSite that records what its connections carried."""

    protocol = RecordingChannel

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.raw = b""


class IdentityTests(unittest.TestCase):
    """The real client against a real HTTPS server presenting the certificate under test."""

    timeout = 15

    def setUp(self):
        self.ca = Authority(self.mktemp())
        self.stats = Counter()
        self.reporters: list[Reporter] = []
        self.servers: list = []
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(self.stop_all)

    @defer.inlineCallbacks
    def stop_all(self):
        yield stop_loopback(self.reporters, self.servers)
        globalLogPublisher.removeObserver(self.events.append)

    def serve(self, certificates: Certificates):
        support = SupportResource()
        site = RecordingSite(support)
        listening = listen(reactor, site, certificates)
        self.servers.append((site, listening))
        return support, site, listening.getHost().port

    def start(self, port: int, host: str, **settings) -> Reporter:
        config = Config(support_host=host, support_port=port, support_client_id=CLIENT,
                        support_api_key=KEY, spool_dir=self.mktemp(), **settings)
        rep = Reporter(config, reactor, self.stats, backoff_base=0.05, backoff_cap=0.2,
                       connect_timeout=2, response_timeout=3)
        rep.startService()
        self.reporters.append(rep)
        return rep

    @defer.inlineCallbacks
    def refused(self, certificates: Certificates, host: str, **settings):
        """Submit a report to a server with `certificates`: the error logged, once refused."""
        support, site, port = self.serve(certificates)
        rep = self.start(port, host, **settings)
        yield rep.submit(report(1))
        yield wait_until(
            lambda: self.stats["reports_retried"] >= 2 or self.stats["reports_delivered"]
        )
        self.assertEqual(self.stats["reports_delivered"], 0)
        self.assertEqual(rep.spool.count, 1)
        # Not a byte of HTTP reached the server: no request, no Authorization header, no key.
        self.assertEqual(support.received, [])
        self.assertEqual(site.raw, b"")
        texts = [formatEvent(e) for e in self.events]
        self.assertFalse([t for t in texts if KEY in t])
        # Twisted's own verifier logs a swallowed error at critical level: none may be left.
        self.assertFalse([t for t in texts if "while verifying certificate" in t])
        errors = [formatEvent(e) for e in self.events
                  if e.get("log_level") == LogLevel.error and "not delivered" in formatEvent(e)]
        self.assertEqual(len(errors), 1, texts)
        return errors[0]

    @defer.inlineCallbacks
    def test_san_less_certificate_is_refused_for_a_dns_name(self):
        # The common name is the very host: only subjectAltName counts (RFC 6125).
        leaf = self.ca.leaf("cn-only", "localhost")
        line = yield self.refused(leaf, "localhost", support_ca_file=self.ca.ca_file)
        self.assertIn("TLS verification failed for localhost: its certificate does not name "
                      "localhost", line)
        self.assertIn("subjectAltName", line)

    @defer.inlineCallbacks
    def test_san_less_certificate_is_refused_for_an_ip_address(self):
        leaf = self.ca.leaf("cn-only-ip", "127.0.0.1")
        line = yield self.refused(leaf, "127.0.0.1", support_ca_file=self.ca.ca_file)
        self.assertIn("TLS verification failed for 127.0.0.1: its certificate does not name "
                      "127.0.0.1", line)
        self.assertIn("subjectAltName", line)

    @defer.inlineCallbacks
    def test_san_less_certificate_for_another_name_is_refused(self):
        leaf = self.ca.leaf("cn-other", "anything.example")
        line = yield self.refused(leaf, "localhost", support_ca_file=self.ca.ca_file)
        self.assertIn("its certificate does not name localhost", line)

    @defer.inlineCallbacks
    def test_a_dns_name_the_certificate_does_not_name_is_refused(self):
        leaf = self.ca.leaf("other-name", "other.test", ["other.test"])
        line = yield self.refused(leaf, "localhost", support_ca_file=self.ca.ca_file)
        self.assertIn("TLS verification failed for localhost: its certificate does not name "
                      "localhost; use the name the certificate is for as support_host", line)

    @defer.inlineCallbacks
    def test_an_ip_address_the_certificate_does_not_name_is_refused(self):
        leaf = self.ca.leaf("other-ip", "support", ["127.0.0.2", "localhost"])
        line = yield self.refused(leaf, "127.0.0.1", support_ca_file=self.ca.ca_file)
        self.assertIn("its certificate does not name 127.0.0.1", line)

    @defer.inlineCallbacks
    def test_an_expired_certificate_is_refused(self):
        leaf = self.ca.leaf("expired", "localhost", ["localhost", "127.0.0.1"], expired=True)
        line = yield self.refused(leaf, "localhost", support_ca_file=self.ca.ca_file)
        self.assertIn("TLS verification failed for localhost: certificate verify failed", line)

    @defer.inlineCallbacks
    def test_a_certificate_signed_by_another_ca_is_refused(self):
        other = Authority(self.mktemp(), "another CA")
        leaf = other.leaf("other-ca", "localhost", ["localhost", "127.0.0.1"])
        line = yield self.refused(leaf, "localhost", support_ca_file=self.ca.ca_file)
        self.assertIn("TLS verification failed for localhost: certificate verify failed", line)

    @defer.inlineCallbacks
    def test_a_certificate_naming_the_host_is_delivered(self):
        leaf = self.ca.leaf("good", "support", ["localhost"])
        support, _, port = self.serve(leaf)
        rep = self.start(port, "localhost", support_ca_file=self.ca.ca_file)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(support.received[0].headers[b"authorization"], [f"Bearer {KEY}".encode()])

    @defer.inlineCallbacks
    def test_skip_ssl_verification_still_accepts_a_san_less_certificate(self):
        for number, host in enumerate(("localhost", "127.0.0.1"), 1):
            leaf = self.ca.leaf(f"cn-only-{number}", host)
            support, _, port = self.serve(leaf)
            self.start(port, host, skip_ssl_verification=True)
            yield self.reporters[-1].submit(report(number))
            yield wait_until(lambda number=number: self.stats["reports_delivered"] == number)
            self.assertEqual(len(support.received), 1)
