"""The HTTPS policy for the Support Server: which certificates are trusted and which name the
certificate must carry (IPolicyForHTTPS), and the CA bundle of support_ca_file."""

from __future__ import annotations

import ipaddress
import re

from OpenSSL import SSL
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tempesta_ts.config import ConfigError
from tempesta_ts.hosts import bare_host

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def is_ip_address(host: str) -> bool:
    """Whether host is an IPv4 or IPv6 literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def load_ca_bundle(path: str) -> list[ssl.Certificate]:
    """Every certificate of a PEM bundle; ConfigError when there is none or one is broken."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(
            f"support_ca_file: cannot read {path!r} ({e.strerror}); "
            "expected a PEM file of CA certificates"
        ) from None
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ConfigError(
            f"support_ca_file: no certificate in {path!r}; expected a PEM file of CA certificates"
        )
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except Exception as e:
            raise ConfigError(
                f"support_ca_file: certificate {number} of {path!r} does not parse ({e}); "
                "expected a PEM file of CA certificates"
            ) from None
    return certificates


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """TLS that accepts any certificate (skip_ssl_verification) yet still names the host by SNI."""

    def __init__(self, host: str) -> None:
        self._options = ssl.CertificateOptions(verify=False)
        # CertificateOptions alone sends no SNI, and name-based servers then answer with their
        # default certificate or refuse. An IP literal is never sent as SNI (RFC 6066).
        self.server_name = None if is_ip_address(host) else host.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self.server_name is not None:
            connection.set_tlsext_host_name(self.server_name)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class VerifiedTLS:
    """TLS that checks the chain against `trust` and that the certificate's subjectAltName names
    the host (DNS name or IP address); anything else, a certificate without one too, fails.

    Twisted's own check (optionsForClientTLS) lets a certificate without subjectAltName through:
    it catches only VerificationError, logs service_identity's CertificateError and goes on.
    """

    def __init__(self, host: str, trust) -> None:
        # None is platformTrust(): the system store. Twisted sends SNI for a DNS name only.
        self._options = ssl.optionsForClientTLS(host, trustRoot=trust)
        self._identity = IPAddress_ID(host) if is_ip_address(host) else DNS_ID(host)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tlsProtocol):
        # Let go of the protocol once the leaf is seen: no cycle through the connection.
        protocol = [tlsProtocol]

        def verify(connection, certificate, code, depth, ok) -> bool:
            # The chain is OpenSSL's to judge; an OpenSSL callback must not raise, so whatever
            # goes wrong with the leaf's names refuses the server.
            if depth != 0 or not ok:
                return bool(ok)
            owner = protocol.pop() if protocol else None
            try:
                verify_service_identity(extract_patterns(certificate), [self._identity], [])
                return True
            except Exception:
                reason = Failure()
            try:
                if owner is not None:
                    # The reason the request fails with, for describe_failure.
                    owner.failVerification(reason)
            except Exception:
                pass  # refused all the same, only with OpenSSL's reason
            return False

        return verify


@implementer(IPolicyForHTTPS)
class HTTPSPolicy:
    """Verifies the Support Server against the system store or support_ca_file, or not at all.

    The certificate must name the host as written in the config, DNS name or IP address.
    """

    def __init__(self, configured_host: str, ca_file: str | None, verify: bool) -> None:
        self.host = bare_host(configured_host)
        self.verify = verify
        if not verify:
            self._creator = UnverifiedTLS(self.host)
        else:
            # None is platformTrust(): the system store.
            trust = ssl.trustRootFromCertificates(load_ca_bundle(ca_file)) if ca_file else None
            # An IP literal is checked against the IP SANs and sent no SNI; a DNS name against
            # the DNS SANs, with SNI.
            self._creator = VerifiedTLS(self.host, trust)

    def creatorForNetloc(self, hostname: bytes, port: int):
        # The agent only ever connects to the configured host (no redirects are followed):
        # verify that name, as written, whatever the URL says.
        return self._creator
