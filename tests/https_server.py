"""A real HTTPS Support Server on loopback for tests: a private CA, a server certificate."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, ssl
from twisted.web import http, resource, server

from tests.waits import wait_until


@dataclass(frozen=True)
class Certificates:
    """PEM files written by `make_certificates`."""

    ca_file: str
    server_cert_file: str
    server_key_file: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: str) -> Certificates:
    """A CA and a server certificate it signs for 127.0.0.1, ::1 and localhost, as PEM files."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tempesta-ts test CA"))
        .issuer_name(_name("tempesta-ts test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("support.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = Certificates(
        ca_file=os.path.join(directory, "ca.pem"),
        server_cert_file=os.path.join(directory, "server.pem"),
        server_key_file=os.path.join(directory, "server-key.pem"),
    )
    with open(files.ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(files.server_cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(files.server_key_file, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


@dataclass(frozen=True)
class Received:
    """One request as the server saw it; the body is decompressed when it came gzipped."""

    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    raw_body: bytes
    body: bytes
    server_name: bytes | None


class SupportResource(resource.Resource):
    """Records every request and answers with the next status of `statuses` (then 200)."""

    isLeaf = True

    def __init__(self, statuses=()) -> None:
        super().__init__()
        self.statuses = list(statuses)
        self.received: list[Received] = []
        self.waiters: list[tuple[int, defer.Deferred]] = []

    def render_POST(self, request) -> bytes:
        raw = request.content.read()
        encoding = request.requestHeaders.getRawHeaders(b"content-encoding", [b""])[0]
        body = gzip.decompress(raw) if encoding == b"gzip" else raw
        connection = request.channel.transport.getHandle()
        name = connection.get_servername() if hasattr(connection, "get_servername") else None
        self.received.append(
            Received(
                request.method,
                request.path,
                {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                raw,
                body,
                name,
            )
        )
        status = self.statuses.pop(0) if self.statuses else 200
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for count, d in list(self.waiters):
            if len(self.received) >= count:
                self.waiters.remove((count, d))
                d.callback(None)
        return b'{"status": "accepted"}' if status < 300 else b'{"error": "test"}'

    def wait_for(self, count: int) -> defer.Deferred:
        """Fire once `count` requests have been received."""
        d = defer.Deferred()
        if len(self.received) >= count:
            d.callback(None)
        else:
            self.waiters.append((count, d))
        return d


def server_tls_options(certificates: Certificates) -> ssl.CertificateOptions:
    """TLS options for the test server: its certificate and key."""
    with open(certificates.server_cert_file, "rb") as f:
        cert_pem = f.read()
    with open(certificates.server_key_file, "rb") as f:
        key_pem = f.read()
    private = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    return private.options()


class TrackingChannel(http.HTTPChannel):
    """An HTTP channel the site counts while it is open."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.open_channels.add(self)

    def connectionLost(self, reason) -> None:
        self.site.open_channels.discard(self)
        super().connectionLost(reason)


class TrackingSite(server.Site):
    """A site that knows its open connections, so that a test ends only once they are closed."""

    protocol = TrackingChannel

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.open_channels: set = set()
        self.noisy = False


def listen(reactor, site: TrackingSite, certificates: Certificates, port: int = 0,
           interface: str = "127.0.0.1"):
    """Listen with TLS; the caller stops the returned port."""
    return reactor.listenSSL(port, site, server_tls_options(certificates), interface=interface)


@defer.inlineCallbacks
def stop_loopback(reporters, servers):
    """Stop the reporters, then the servers ((site, listening port) pairs) once each has seen
    its connections closed: the clients' pools close the persistent connections first."""
    for rep in reporters:
        if rep.running:
            yield rep.stopService()
    for site, listening in servers:
        yield listening.stopListening()
        yield wait_until(lambda site=site: not site.open_channels)
