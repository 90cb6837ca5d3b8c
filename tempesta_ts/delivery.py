"""The delivery of one report over HTTPS: the request the contract describes, the reading of
the answer, Retry-After, and what a failed attempt was, said in one line.

No retries here (tempesta_ts/reporter.py schedules them); docs/support-api.md has the contract.
"""

from __future__ import annotations

import email.utils
import gzip
from dataclasses import dataclass
from datetime import timezone
from http.cookiejar import CookieJar, DefaultCookiePolicy

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from tempesta_ts import __version__
from tempesta_ts.config import Config
from tempesta_ts.hosts import bare_host, bracketed, host_port
from tempesta_ts.https_policy import HTTPSPolicy

#: JSON bodies larger than this are sent gzip-compressed (support-api.md).
GZIP_THRESHOLD = 65536
CONNECT_TIMEOUT = 10.0
#: Bytes of an answer's body kept for the log: the API key is masked in all of them before the
#: quote is cut, so that a key echoed across the cut is masked whole.
QUOTE_BYTES = 4096
#: Idle persistent connections are closed before a typical server (60 s and more) would.
IDLE_CONNECTION_SECONDS = 30.0

USER_AGENT = f"tempesta-ts/{__version__}"

#: Answers that refuse a report for good: it is kept under rejected/, never sent again.
REJECTED = frozenset({400, 413, 422})
#: Answers that refuse the credentials: retried at the slowest pace.
REFUSED_CREDENTIALS = frozenset({401, 403})
#: Answers, beside 5xx, of a Support Server too busy to take the report now.
BUSY = frozenset({408, 429})

#: What a failure can be, as /status.json says it (spool.last_error_kind) and the probe reads
#: it: the TLS handshake or verification, the credentials refused (401, 403), the connection
#: refused, no connection or answer in time, the name not resolving, the report rejected for
#: good (400, 413, 422), the Support Server failing or busy (5xx, 408, 429), anything else
#: (another status such as 404 or 3xx, a connection lost or impossible, an unreadable spool).
FAILURE_KINDS = (
    "tls", "credentials", "refused", "timeout", "dns", "rejected", "server_error", "other"
)


@implementer(IAgentEndpointFactory)
class SupportEndpoints:
    """Connects to the configured host and port with TLS, whatever host the URL names.

    hyperlink (used by treq) cannot put an IPv6 literal in a URL, so the URL may name a
    placeholder; the Host header then carries the real one.
    """

    def __init__(self, reactor, policy: HTTPSPolicy, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.host = bare_host(host)
        self.port = port
        self.timeout = timeout

    def endpointForURI(self, uri):
        creator = self.policy.creatorForNetloc(self.host.encode("idna"), self.port)
        tcp = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        return wrapClientTLS(creator, tcp)


class QuietConnectionPool(HTTPConnectionPool):
    """A connection pool whose connections do not log "Starting factory" each."""

    _factory = type("QuietHTTP11ClientFactory", (HTTPConnectionPool._factory,), {"noisy": False})


@implementer(IAgent)
class ContractHeadersAgent:
    """Drops the Accept-Encoding that treq always adds: the contract lists every header sent."""

    def __init__(self, agent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        if headers is not None and headers.hasHeader(b"accept-encoding"):
            headers = headers.copy()
            headers.removeHeader(b"accept-encoding")
        return self._agent.request(method, uri, headers, bodyProducer)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer) -> defer.Deferred:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def compress_if_large(body: bytes) -> tuple[bytes, bool]:
    """(payload, gzipped): gzip only above GZIP_THRESHOLD; same bytes on every retry (mtime 0)."""
    if len(body) > GZIP_THRESHOLD:
        return gzip.compress(body, compresslevel=6, mtime=0), True
    return body, False


def support_url(host: str, port: int, path: str) -> tuple[str, bytes | None]:
    """The request URL, and the Host header to set when the URL cannot carry the host."""
    host = bare_host(host)
    if ":" in host:
        shown = bracketed(host) if port == 443 else host_port(host, port)
        return f"https://ipv6-literal.invalid:{port}{path}", shown.encode("ascii")
    return f"https://{host}:{port}{path}", None


def parse_retry_after(value: bytes | None, now: float) -> float | None:
    """Retry-After in seconds from now: delta-seconds or an HTTP-date; None when absent or bad."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


class _BodyQuote(Protocol):
    """Reads an answer's body to its end, keeping only its first bytes. With `lenient`, a body
    cut short ends the read as well as a whole one."""

    def __init__(self, finished: defer.Deferred, limit: int, lenient: bool) -> None:
        self.finished = finished
        self.limit = limit
        self.lenient = lenient
        self.kept = b""

    def dataReceived(self, data: bytes) -> None:
        if len(self.kept) < self.limit:
            self.kept += data[: self.limit - len(self.kept)]

    def connectionLost(self, reason=None) -> None:
        if self.finished.called:
            return  # cancelled (the attempt's deadline): the connection is aborted after
        if reason is None or reason.check(ResponseDone, PotentialDataLoss) or self.lenient:
            self.finished.callback(self.kept)
        else:
            self.finished.errback(reason)


def read_quote(response, limit: int = QUOTE_BYTES) -> defer.Deferred:
    """Fire with the first `limit` bytes of the body once it is all read; cancel aborts it.

    A 2xx answer is a delivery whatever its body: one cut short (the server hung up) or
    cancelled (a body that trickles past the deadline) fires with what was read.
    """
    reader: _BodyQuote | None = None
    delivered = 200 <= response.code < 300

    def cancel(d: defer.Deferred) -> None:
        if reader is not None and reader.transport is not None:
            reader.transport.stopProducing()
        if delivered and not d.called:
            d.callback(reader.kept if reader is not None else b"")

    finished = defer.Deferred(cancel)
    reader = _BodyQuote(finished, limit, lenient=delivered)
    response.deliverBody(reader)
    return finished


def _reasons(value: BaseException) -> list[BaseException]:
    # ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed... wrap a list of Failures.
    inner = getattr(value, "reasons", None)
    if not inner:
        return [value]
    found = []
    for reason in inner:
        found.extend(_reasons(reason.value if isinstance(reason, Failure) else reason))
    return found


def _openssl_reasons(value: SSL.Error) -> str:
    # pyOpenSSL's Error carries a list of (library, function, reason) tuples.
    details = value.args[0] if value.args and isinstance(value.args[0], list) else []
    reasons = [d[2] for d in details if isinstance(d, tuple) and len(d) == 3 and d[2]]
    return "; ".join(reasons) or str(value) or "TLS error"


@dataclass(frozen=True)
class Failed:
    """What a failed attempt was: its kind (one of FAILURE_KINDS: what /status.json and the
    probe go by), one line saying why with the fix, and the finer cause that groups its
    notices in the log (tls-verify, http-503, lost...)."""

    kind: str
    why: str
    cause: str


def describe_failure(failure: Failure, host: str, port: int) -> Failed:
    """What an attempt that got no answer ran into: TLS, the connection, the name."""
    reasons = _reasons(failure.value)
    for value in reasons:
        if isinstance(value, CertificateError):
            # No subjectAltName (or a malformed one): the common name is not a host's name.
            return Failed("tls", (
                f"TLS verification failed for {host}: its certificate does not name {host} "
                f"(no valid subjectAltName; the common name does not count); have it reissued "
                f"with {host} in subjectAltName, or set skip_ssl_verification"
            ), "tls-verify")
        if isinstance(value, VerificationError):
            return Failed("tls", (
                f"TLS verification failed for {host}: its certificate does not name {host}; "
                "use the name the certificate is for as support_host, or support_ca_file / "
                "skip_ssl_verification"
            ), "tls-verify")
        if isinstance(value, SSL.Error):
            text = _openssl_reasons(value)
            if "certificate verify failed" in text:
                return Failed("tls", (
                    f"TLS verification failed for {host}: certificate verify failed (not signed "
                    "by a trusted CA, or expired); set support_ca_file to the PEM of the CA that "
                    "signed it, or skip_ssl_verification"
                ), "tls-verify")
            return Failed("tls", f"TLS handshake with {host}:{port} failed: {text}", "tls")
    for value in reasons:
        if isinstance(value, error.ConnectionRefusedError):
            return Failed("refused", f"connection refused by {host}:{port}", "refused")
        if isinstance(value, error.DNSLookupError):
            return Failed("dns", f"cannot resolve {host} (DNS)", "dns")
        if isinstance(value, (error.TimeoutError, error.TCPTimedOutError)):
            return Failed("timeout", f"timeout connecting to {host}:{port}", "timeout")
        if isinstance(value, error.ConnectError):
            return Failed("other", f"cannot connect to {host}:{port}: {value}", "connect")
    value = reasons[0]
    if isinstance(value, (error.ConnectionLost, error.ConnectionDone)):
        return Failed("other", f"connection to {host}:{port} lost before an answer", "lost")
    text = str(value) or type(value).__name__
    return Failed("other", f"{type(value).__name__}: {text[:200]}", "other")


def describe_timeout(host: str, port: int, seconds: float) -> Failed:
    """An attempt that had no whole answer within `seconds`."""
    return Failed(
        "timeout", f"no answer from {host}:{port} within {seconds:g} s (timeout)", "timeout"
    )


def describe_answer(status: int, client_id: str) -> Failed:
    """An answer neither 2xx nor a rejection (REJECTED): all are retried."""
    if status in REFUSED_CREDENTIALS:
        return Failed("credentials", (
            f"HTTP {status}: the Support Server refused the credentials of client "
            f"{client_id}; check support_client_id and the API key"
        ), "credentials")
    kind = "server_error" if status >= 500 or status in BUSY else "other"
    return Failed(kind, f"HTTP {status} from the Support Server", f"http-{status}")


class SupportClient:
    """Posts one report to the Support Server as the contract says and reads the answer.

    Without an http_client of its own it connects with a pool of persistent connections, at
    most max_connections of them, verified by HTTPSPolicy.
    """

    def __init__(self, config: Config, reactor, http_client: HTTPClient | None = None, *,
                 max_connections: int, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.host = bare_host(config.support_host)
        self.port = config.support_port
        self.url, host_header = support_url(
            config.support_host, config.support_port, config.support_path
        )
        self._headers = {
            b"Content-Type": [b"application/json"],
            b"X-Client-Id": [config.support_client_id.encode("utf-8")],
            b"Authorization": [b"Bearer " + config.support_api_key.encode("utf-8")],
            b"User-Agent": [USER_AGENT.encode("ascii")],
        }
        if host_header is not None:
            self._headers[b"Host"] = [host_header]
        self._pool = None
        if http_client is None:
            policy = HTTPSPolicy(
                config.support_host, config.support_ca_file, not config.skip_ssl_verification
            )
            self._pool = QuietConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_connections
            self._pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
            endpoints = SupportEndpoints(
                reactor, policy, config.support_host, config.support_port, connect_timeout
            )
            agent = ContractHeadersAgent(
                Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
            )
            # Cookies set by a load balancer are not part of the contract: never send any.
            no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
            http_client = HTTPClient(
                agent, cookiejar=no_cookies, data_to_body_producer=BytesProducer
            )
        self._client = http_client

    def post(self, report_id: str, body: bytes) -> defer.Deferred:
        """Fire with (status, headers, the first QUOTE_BYTES of the answer's body) once the answer
        is read to its end; cancelling it aborts the request."""
        payload, gzipped = compress_if_large(body)
        headers = Headers(self._headers)
        headers.setRawHeaders(b"Idempotency-Key", [report_id.encode("ascii")])
        if gzipped:
            headers.setRawHeaders(b"Content-Encoding", [b"gzip"])
        try:
            d = self._client.post(
                self.url, data=payload, headers=headers, allow_redirects=False, unbuffered=True
            )
        except Exception:
            d = defer.fail()
        return d.addCallback(lambda response: read_quote(response).addCallback(
            lambda quote: (response.code, response.headers, quote)))

    def close(self) -> defer.Deferred:
        """Close the idle persistent connections."""
        if self._pool is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self._pool.closeCachedConnections)
