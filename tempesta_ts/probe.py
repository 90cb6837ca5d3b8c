"""tempesta-ts-probe: check a running server end to end, as an operator would by hand.

It sends test netconsole datagrams (plain and extended) and a system information document to
the server from this machine, confirms through /status.json that the server took them in and,
with --incident, follows a test WARNING's report until it is delivered or written.
docs/probe.md says what each message means and what to do.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from tempesta_ts import __version__

PROG = "tempesta-ts-probe"
#: The server's default metrics_host:metrics_port.
DEFAULT_STATUS_URL = "http://127.0.0.1:9478/status.json"
DEFAULT_PORT = 5555
DEFAULT_TIMEOUT = 30.0
#: The server's default settle_seconds: a report waits that long before it is sent.
DEFAULT_SETTLE = 5.0
#: Between two reads of /status.json (each costs the server about 0.2 s at 10,000 instances).
POLL_SECONDS = 0.25
#: One read of /status.json waits at most this long (and never past the step's deadline).
REQUEST_SECONDS = 10.0
#: Nonce letters: none is a hexadecimal digit, so the incident signature never masks the nonce
#: (it masks numbers and runs of 8 hex digits) and every run's warning is a new incident.
NONCE_LETTERS = "ghjkmnpqrstvwxyz"
NONCE_LENGTH = 10


# --- options ---------------------------------------------------------------------------------


def ip_address(value: str) -> str:
    """An IPv4 or IPv6 address, as netconsole needs one."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address; give the address the instances' netconsole "
            "sends to (netconsole takes no host names)"
        ) from None


ip_address.coerceDoc = "An IPv4 or IPv6 address."


def _bounded(convert, lo: float, hi: float, noun: str, bounds: str, doc: str, low_open=False):
    """A coerce function: a number `convert` parses, from lo to hi (lo excluded if low_open)."""

    def coerce(value: str):
        try:
            number = convert(value)
        except ValueError:
            raise ValueError(f"{value!r} is not {noun}") from None
        if not (lo < number if low_open else lo <= number) or number > hi:
            raise ValueError(f"{value} {bounds}")
        return number

    coerce.coerceDoc = doc
    return coerce


port_number = _bounded(int, 1, 65535, "a port number", "is not a port number (1 to 65535)",
                       "1 to 65535.")
seconds = _bounded(float, 0, 86400, "a number of seconds", "is not between 0 and 86400 seconds",
                   "Seconds, more than 0.", low_open=True)
#: Like the server's settle_seconds.
settle_seconds = _bounded(float, 0, 3600, "a number of seconds",
                          "is not between 0 and 3600 seconds", "Seconds, 0 to 3600.")


def http_url(value: str) -> str:
    """An http:// or https:// URL with a host."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{value!r} is not an http:// URL; give the server's metrics_host:metrics_port, "
            f"e.g. {DEFAULT_STATUS_URL}"
        )
    return value


http_url.coerceDoc = "An http:// URL."


def _flag(name: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    """A coerce function whose error names the flag (usage.Options would say less)."""

    def flag(value: str):
        try:
            return coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None

    flag.coerceDoc = coerce.coerceDoc
    return flag


class Options(usage.Options):
    """The probe's command line."""

    optParameters = [
        ["host", None, None, "IP address of the server, as the instances send to it",
         _flag("host", ip_address)],
        ["port", None, DEFAULT_PORT, "Port of the server, UDP and TCP (its --port).",
         _flag("port", port_number)],
        ["status-url", None, DEFAULT_STATUS_URL,
         "The server's /status.json (its metrics_host:metrics_port).",
         _flag("status-url", http_url)],
        ["timeout", None, DEFAULT_TIMEOUT, "Seconds to wait for each step to be confirmed.",
         _flag("timeout", seconds)],
        ["settle", None, DEFAULT_SETTLE,
         "The server's settle_seconds, added to the wait for a report.",
         _flag("settle", settle_seconds)],
    ]
    optFlags = [
        ["incident", None, "Also send a test WARNING and follow its report to the end."],
        ["plain-only", None, "Send only the plain netconsole datagram."],
        ["extended-only", None, "Send only the extended netconsole datagram."],
    ]

    def __init__(self, prog: str = PROG) -> None:
        super().__init__()
        self.prog = prog
        self.synopsis = f"Usage: {prog} --host ADDRESS [options]"
        self.longdesc = (
            "Sends test netconsole datagrams and a system information document to a tempesta-ts "
            "server from this machine and confirms through its /status.json that they arrived; "
            "with --incident also follows a test WARNING's report. Exit status: 0 all worked, "
            "1 something failed (the reason is printed), 2 usage error. See docs/probe.md."
        )

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"{self.prog} (tempesta-ts) {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["host"] is None:
            raise usage.UsageError(
                "--host is required: the IP address of the server, as the instances' "
                "netconsole sends to it"
            )
        if self["plain-only"] and self["extended-only"]:
            raise usage.UsageError("--plain-only and --extended-only exclude each other")


# --- what is sent ----------------------------------------------------------------------------


def make_nonce() -> str:
    """Letters that mark this run's messages and make its warning a new incident."""
    return "".join(secrets.choice(NONCE_LETTERS) for _ in range(NONCE_LENGTH))


def sequence_number(now: float) -> int:
    """The extended sequence number of a probe run's first message: 0.

    Each run numbers its messages as a booting kernel does, from 0, so the server sees the
    probe's own instance "reboot" and counts neither a loss (a number moving forward with
    time would count the time between two runs) nor a duplicate (an old number again).
    """
    return 0


def plain_datagram(text: str) -> bytes:
    """A plain netconsole line, with the console's time stamp."""
    return f"[    0.000000] {text}\n".encode("utf-8")


def extended_datagram(level: int, seq: int, text: str) -> bytes:
    """An extended netconsole message."""
    return f"{level},{seq},0,-;{text}\n".encode("utf-8")


def document(nonce: str, now: float) -> bytes:
    """The system information document, tagged as the vendor's script sends it."""
    body = {"probe": nonce, "tool": PROG, "version": __version__, "sent_at": round(now, 3)}
    return b"<sys-info>" + json.dumps(body).encode("ascii") + b"</sys-info>"


def test_warning(nonce: str) -> str:
    """The incident line: the vendor's test message, which the rules detect as a warning."""
    return f"WARNING test message from {PROG} {nonce}"


# --- reading /status.json --------------------------------------------------------------------


class ProbeFailed(Exception):
    """A step failed: why, in one line, and what to do about it."""

    def __init__(self, reason: str, advice: str | None = None, step: str = "server status") -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice
        self.step = step


def same_address(a: str, b: str) -> bool:
    """Whether two addresses are one instance (``::ffff:a.b.c.d`` is ``a.b.c.d``)."""
    def norm(text: str):
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return text
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped if mapped is not None else ip

    return norm(a) == norm(b)


def find_instance(doc: dict[str, Any] | None, address: str | None) -> dict[str, Any] | None:
    """The instance of ``address`` in a status document, or None."""
    if doc is None or address is None:
        return None
    for instance in doc["instances"]:
        if same_address(instance.get("address", ""), address):
            return instance
    return None


def appended(instance: dict[str, Any] | None) -> int:
    """Lines ever appended to an instance's buffer (those held plus those pushed out)."""
    if instance is None:
        return 0
    return instance.get("lines", 0) + instance.get("lines_pushed_out", 0)


def counter(doc: dict[str, Any], key: str) -> int:
    """A counter of a status document, 0 when absent."""
    return doc.get("counters", {}).get(key, 0)


def _request_failure(url: str, failure) -> ProbeFailed:
    value = failure.value
    reasons = getattr(value, "reasons", None) or []
    for inner in reasons:
        value = getattr(inner, "value", value)
    where = f"cannot read the server's status at {url}"
    check = (
        "run the probe on the server's machine, or give --status-url with the server's "
        "metrics_host:metrics_port (metrics_port 0 turns the endpoint off)"
    )
    if isinstance(value, error.ConnectionRefusedError):
        return ProbeFailed(
            f"{where}: connection refused (the server is not running, or its metrics endpoint "
            "is off or elsewhere)",
            f"start the server, or {check}",
        )
    if isinstance(value, error.DNSLookupError):
        return ProbeFailed(f"{where}: the host does not resolve", check)
    if isinstance(value, (defer.TimeoutError, error.TimeoutError, defer.CancelledError)):
        return ProbeFailed(
            f"{where}: no answer in time",
            f"check that the address is reachable from here (a firewall?), or {check}",
        )
    if isinstance(value, error.ConnectError):
        return ProbeFailed(f"{where}: {value}", check)
    return ProbeFailed(f"{where}: {type(value).__name__}: {value}", check)


# --- what a delivery error means -------------------------------------------------------------

#: last_error openings that will not go away by retrying: the probe stops at once.
LASTING = ("TLS verification failed", "TLS handshake", "HTTP 401", "HTTP 403")


def is_lasting(last_error: str) -> bool:
    """Whether a delivery error needs the operator (a retry cannot fix it)."""
    return last_error.startswith(LASTING)


def advice_for(last_error: str) -> str:
    """What to do about the server's spool.last_error, in plain words."""
    e = last_error
    restart = "then restart the server; the report stays in the spool and is sent then"
    if e.startswith("TLS verification failed"):
        if "does not name" in e:
            return (
                "the Support Server's certificate is for another name: set support_host to the "
                f"name the certificate is for (or support_ca_file / skip_ssl_verification), {restart}"
            )
        return (
            "the server does not trust the Support Server's certificate: set support_ca_file to "
            "the PEM of the CA that signed it (skip_ssl_verification only for a test setup), "
            f"{restart}"
        )
    if e.startswith("TLS handshake"):
        return (
            "the TLS handshake failed: check that support_host:support_port is the Support "
            "Server's HTTPS port (not plain HTTP) and that it accepts TLS 1.2 or later"
        )
    if e.startswith(("HTTP 401", "HTTP 403")):
        return (
            "the Support Server refused the credentials: check support_client_id and the API key "
            "(support_api_key_file or the environment) with the vendor, then restart the "
            "server; meanwhile it retries every 5 minutes"
        )
    if "rejected" in e:
        return (
            "the Support Server refused the report for good; it is kept in "
            "spool_dir/rejected/; send the server's log line with the answer to the vendor"
        )
    if e.startswith("connection refused"):
        return (
            "nothing accepts connections at support_host:support_port: check both settings and "
            "that the Support Server is up and reachable from the server's machine"
        )
    if e.startswith("cannot resolve"):
        return "support_host does not resolve on the server's machine: check the name and its DNS"
    if e.startswith(("timeout", "no answer", "cannot connect")):
        return (
            "the Support Server is not reachable from the server's machine: check the network "
            "path (firewall, routing, outbound HTTPS allowed to support_host:support_port)"
        )
    if e.startswith("connection to"):
        return (
            "the connection was closed before an answer: a proxy or load balancer in between, "
            "or the Support Server failed; the server retries; contact the vendor if it persists"
        )
    if e.startswith(("HTTP 5", "HTTP 429", "HTTP 408")):
        return (
            "the Support Server is failing or busy; the server retries with backoff; contact the "
            "vendor if it persists"
        )
    if e.startswith("HTTP 3") or e.startswith("HTTP 404"):
        return "the URL is not the reports endpoint: check support_host, support_port and support_path"
    if e.startswith("cannot read"):
        return "the server cannot read its own spool: check spool_dir's owner and permissions"
    return "see the server's log for the details of the failure"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# --- sending ---------------------------------------------------------------------------------


class _Datagrams(protocol.DatagramProtocol):
    """A connected UDP socket: its local address is this machine's source toward the server."""

    noisy = False

    def __init__(self) -> None:
        #: Set when the server's host answered "port unreachable" (ICMP).
        self.refused = False

    def connectionRefused(self) -> None:
        self.refused = True


class _Document(protocol.Protocol):
    """Writes one document, closes, and fires ``done`` once the connection is gone."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.local: str | None = None
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.local = self.transport.getHost().host
        self.transport.write(self.data)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.done.callback(None)


@dataclass
class _Check:
    """One thing the probe confirms: what it is, whether it worked, and if not why."""

    name: str
    ok: bool = False
    reason: str | None = None
    advice: str | None = None


# --- the probe -------------------------------------------------------------------------------


class Probe:
    """One run of the probe; ``run()`` fires with the exit status."""

    def __init__(
        self,
        reactor,
        options: Options,
        out: Callable[[str], None],
        *,
        poll_interval: float = POLL_SECONDS,
        nonce: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = options["host"]
        self.port = options["port"]
        self.url = options["status-url"]
        self.timeout = options["timeout"]
        self.settle = options["settle"]
        self.incident = options["incident"]
        self.plain = not options["extended-only"]
        self.extended = not options["plain-only"]
        self.out = out
        self.poll_interval = poll_interval
        self.nonce = nonce or make_nonce()
        self.checks: list[_Check] = []
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, pool=self._pool))
        self._udp = None
        self._datagrams = _Datagrams()
        self._seq = sequence_number(reactor.seconds())

    @property
    def _shown(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @defer.inlineCallbacks
    def run(self):
        """Every step in order; fires with 0 when all worked, else 1."""
        self.out(
            f"{PROG} {__version__}: probing {self._shown} (nonce {self.nonce}); "
            f"status from {self.url}"
        )
        try:
            yield self._steps()
        except ProbeFailed as e:
            self.checks.append(_Check(e.step, reason=e.reason, advice=e.advice))
        finally:
            yield self._close()
        return self._summary()

    def _summary(self) -> int:
        failed = [c for c in self.checks if not c.ok]
        for check in failed:
            self.out(f"problem: {check.reason or check.name + ' not confirmed'}")
            if check.advice:
                self.out(f"  what to do: {check.advice}")
        if failed:
            self.out("FAILED: " + ", ".join(c.name for c in failed) + " (see above)")
            return 1
        self.out("OK: " + ", ".join(c.name for c in self.checks) + " confirmed")
        return 0

    @defer.inlineCallbacks
    def _close(self):
        if self._udp is not None:
            yield defer.maybeDeferred(self._udp.stopListening)
            self._udp = None
        yield self._pool.closeCachedConnections()

    # -- status ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def status(self, deadline: float):
        """/status.json, parsed and checked; raises ProbeFailed."""
        remaining = max(0.1, min(REQUEST_SECONDS, deadline - self.reactor.seconds()))
        try:
            response = yield self._http.get(self.url, reactor=self.reactor, timeout=remaining)
            # treq's timeout ends with the headers; a body that stalls is bounded here.
            remaining = max(0.1, deadline - self.reactor.seconds())
            body = yield response.content().addTimeout(remaining, self.reactor)
        except Exception:
            raise _request_failure(self.url, Failure()) from None
        if response.code != 200:
            raise ProbeFailed(
                f"{self.url} answered HTTP {response.code}, not the status document",
                "give --status-url as http://<metrics_host>:<metrics_port>/status.json",
            )
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not all(
            key in doc for key in ("instances", "counters", "listening", "spool")
        ):
            raise ProbeFailed(
                f"{self.url} is not tempesta-ts's /status.json",
                "give --status-url as http://<metrics_host>:<metrics_port>/status.json",
            )
        return doc

    def _sleep(self):
        return task.deferLater(self.reactor, self.poll_interval, lambda: None)

    # -- the steps --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _steps(self):
        deadline = self.reactor.seconds() + self.timeout
        before = yield self.status(deadline)
        self._describe_server(before)
        source = self._open_udp()
        self._refuse_an_instance(before, source)
        udp = _Check(self._datagram_names())
        self.checks.append(udp)
        self._send_datagrams(udp, source)
        tcp = _Check("system information document")
        self.checks.append(tcp)
        sender = yield self._send_document(tcp, deadline)
        if sender is not None and not same_address(source, sender):
            self.out(f"note: UDP goes out from {source} and TCP from {sender}")
        if udp.reason is not None:
            return
        after = yield self._confirm_intake(before, source, sender, udp, tcp, deadline)
        if self.incident:
            yield self._follow_incident(after, source, udp)

    def _refuse_an_instance(self, before, source: str) -> None:
        """Stop before sending from a machine whose kernel already sends to the server."""
        existing = find_instance(before, source)
        if existing is None or not existing.get("kernel_release"):
            return
        raise ProbeFailed(
            f"this machine ({source}) is an instance of the server, with kernel "
            f"{existing['kernel_release']}: the probe's document would replace its system "
            "information and its sequence numbers would mix with the kernel's; nothing was sent",
            "run the probe from another machine (the server's own, or an operator's); on an "
            "instance use the vendor's check: echo \"WARNING test message\" > /dev/kmsg",
            step="source address",
        )

    def _datagram_names(self) -> str:
        if self.plain and self.extended:
            return "plain and extended netconsole"
        return "plain netconsole" if self.plain else "extended netconsole"

    def _describe_server(self, doc: dict[str, Any]) -> None:
        listening = doc.get("listening") or {}
        host, port = listening.get("host"), listening.get("port")
        if doc.get("mode") == "stand-alone":
            mode = "stand-alone (reports are written under its spool_dir/local/)"
        else:
            mode = f"reports go to {doc.get('support_url')}"
        self.out(
            f"server: tempesta-ts {doc.get('version')}, listening on UDP and TCP {host}:{port}, "
            f"{mode}, {_count(len(doc['instances']), 'instance')}"
        )
        if port and port != self.port:
            self.out(
                f"note: the server of {self.url} listens on port {port}, not {self.port}: "
                "what the probe sends may go to another server (or nowhere)"
            )
        if doc.get("healthy") is False:
            self.out("note: the status says the server's listeners are down (/healthz 503)")

    def _open_udp(self) -> str:
        """A UDP socket connected to the server: its local address is this machine's source."""
        interface = "::" if ":" in self.host else "0.0.0.0"
        try:
            self._udp = self.reactor.listenUDP(0, self._datagrams, interface=interface)
            self._udp.connect(self.host, self.port)
        except Exception as e:
            raise ProbeFailed(
                f"cannot send UDP to {self._shown}: {e}",
                "check --host: this machine needs a route to it",
                step=self._datagram_names(),
            ) from None
        return self._udp.getHost().host

    def _send_datagrams(self, check: _Check, source: str) -> None:
        """The test datagrams, plain and extended as asked."""
        sent = []
        try:
            if self.plain:
                self._datagrams.transport.write(plain_datagram(f"{PROG} {self.nonce} plain"))
                sent.append("a plain netconsole line")
            if self.extended:
                self._datagrams.transport.write(
                    extended_datagram(6, self._seq, f"{PROG} {self.nonce} extended")
                )
                sent.append(f"an extended one (seq {self._seq})")
        except OSError as e:
            check.reason = f"cannot send UDP to {self._shown}: {e.strerror or e}"
            check.advice = "check --host: this machine needs a route to it"
            return
        if not self.plain:
            sent[0] = sent[0].replace("an extended one", "an extended netconsole message")
        self.out(f"sent {' and '.join(sent)} over UDP from {source}")

    @defer.inlineCallbacks
    def _send_document(self, check: _Check, deadline: float):
        """Send the document over TCP; this machine's source address, or None."""
        data = document(self.nonce, self.reactor.seconds())
        remaining = max(0.1, deadline - self.reactor.seconds())
        kind = TCP6ClientEndpoint if ":" in self.host else TCP4ClientEndpoint
        endpoint = kind(self.reactor, self.host, self.port, timeout=max(1, int(remaining)))
        sender = _Document(data)
        try:
            yield connectProtocol(endpoint, sender).addTimeout(remaining, self.reactor)
            yield sender.done.addTimeout(max(0.1, deadline - self.reactor.seconds()), self.reactor)
        except error.ConnectionRefusedError:
            check.reason = (
                f"TCP connection to {self._shown} refused: nothing listens on TCP port "
                f"{self.port} there"
            )
            check.advice = self._listen_advice()
            return None
        except (defer.TimeoutError, error.TimeoutError, error.TCPTimedOutError):
            check.reason = f"no TCP connection to {self._shown} within {self.timeout:g} s"
            check.advice = (
                "a firewall drops it or the host is unreachable: check the network path"
            )
            return None
        except error.ConnectError as e:
            check.reason = f"cannot connect over TCP to {self._shown}: {e}"
            check.advice = "check the network path and --host"
            return None
        self.out(f"sent a system information document ({len(data)} bytes) over TCP from "
                 f"{sender.local}")
        return sender.local

    def _listen_advice(self) -> str:
        return (
            "start the server, or check --host and --port against where it listens "
            "(its start-up line and /status say it); a firewall may also refuse it"
        )

    @defer.inlineCallbacks
    def _confirm_intake(self, before, source, sender, udp: _Check, tcp: _Check, deadline):
        """Poll until the server shows what was sent, or the deadline; returns the last status."""
        wanted = int(self.plain) + int(self.extended)
        base_lines = appended(find_instance(before, source))
        old = find_instance(before, sender) if sender is not None else None
        base_info = (old or {}).get("system_info")
        doc = before
        while True:
            instance = find_instance(doc, source)
            udp.ok = appended(instance) - base_lines >= wanted
            if sender is not None:
                info = (find_instance(doc, sender) or {}).get("system_info")
                tcp.ok = info is not None and info != base_info
            udp_done = udp.ok or self._datagrams.refused
            if udp_done and (tcp.ok or sender is None):
                break
            if self.reactor.seconds() >= deadline:
                break
            yield self._sleep()
            doc = yield self.status(deadline)
        if udp.ok or tcp.ok:
            took = []
            if udp.ok:
                took.append(_count(wanted, "datagram"))
            if tcp.ok:
                took.append("1 document")
            self.out(f"server took in {' and '.join(took)} from {source}")
        if not udp.ok:
            self._why_no_datagrams(before, doc, source, udp, wanted - (appended(
                find_instance(doc, source)) - base_lines))
        if sender is not None and not tcp.ok:
            self._why_no_document(before, doc, sender, tcp)
        return doc

    def _why_no_datagrams(self, before, after, source, check: _Check, missing: int) -> None:
        rejected = counter(after, "sources_rejected") - counter(before, "sources_rejected")
        duplicates = counter(after, "duplicate_messages") - counter(before, "duplicate_messages")
        instance = find_instance(after, source)
        if self._datagrams.refused:
            check.reason = (
                f"UDP to {self._shown} was refused (ICMP port unreachable): nothing listens on "
                f"UDP port {self.port} there"
            )
            check.advice = self._listen_advice()
        elif instance is None and rejected > 0:
            check.reason = (
                f"the server refused this machine's address {source}: it is not in "
                "allowed_sources"
            )
            check.advice = f"add {source} to allowed_sources, or run the probe from an allowed address"
        elif instance is None:
            check.reason = (
                f"nothing from {source} reached the server of {self.url} within "
                f"{self.timeout:g} s"
            )
            check.advice = (
                "check --host/--port against the server's host and port, that a firewall lets "
                f"UDP to port {self.port} through, and that no NAT rewrites the source address "
                "(in Docker, --network=host); and that --status-url is of the same server"
            )
        elif duplicates > 0 and self.extended:
            check.reason = (
                "the extended message was dropped as a duplicate sequence number "
                f"({self._seq})"
            )
            check.advice = "run the probe again (another run in the same millisecond?)"
        else:
            check.reason = (
                f"{missing} of the test datagrams from {source} did not show in the server's "
                f"buffer within {self.timeout:g} s"
            )
            check.advice = (
                "UDP may be lost on the way (look at tempesta_ts_udp_socket_drops_total on "
                "/metrics); run the probe again"
            )

    def _why_no_document(self, before, after, sender, check: _Check) -> None:
        if check.reason is not None:
            return
        delta = {
            key: counter(after, key) - counter(before, key)
            for key in ("sources_rejected", "tcp_connections_refused", "tcp_documents_refused")
        }
        if find_instance(after, sender) is None and delta["sources_rejected"] > 0:
            check.reason = f"the server refused TCP from {sender}: it is not in allowed_sources"
            check.advice = f"add {sender} to allowed_sources, or run the probe from an allowed address"
        elif delta["tcp_connections_refused"] > 0:
            check.reason = "the server refused the connection: tcp_max_connections clients were connected"
            check.advice = "raise tcp_max_connections, or find what keeps so many connections open"
        else:
            check.reason = (
                f"the server shows no new system information from {sender} within "
                f"{self.timeout:g} s"
            )
            check.advice = (
                "check that --status-url is of the server at --host/--port; see the server's log"
            )

    # -- the incident -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _follow_incident(self, before, source, udp: _Check):
        check = _Check("incident report")
        self.checks.append(check)
        if not udp.ok:
            check.reason = "no test incident sent: the datagrams did not arrive"
            return
        line = test_warning(self.nonce)
        if self.plain:
            gram = plain_datagram(line)
        else:
            # Just below this run's first number: taken in as overtaken, no loss counted.
            gram = extended_datagram(4, self._seq + 1, line)
        try:
            self._datagrams.transport.write(gram)
        except Exception as e:
            check.reason = f"cannot send the test warning: {e}"
            return
        self.out(f"sent the test warning: {line}")
        base_lines = appended(find_instance(before, source))
        deadline = self.reactor.seconds() + self.timeout + self.settle
        seen = None
        doc = before
        while True:
            if doc is not before:
                state, report_id = self._incident_state(doc, source, line)
                last_error = doc["spool"].get("last_error")
                shown = (state, report_id, last_error if state == "pending" else None)
                if state is not None and shown != seen:
                    seen = shown
                    self._progress(state, report_id, last_error)
                done = self._incident_outcome(check, state, report_id, last_error)
                if done:
                    return
            if self.reactor.seconds() >= deadline:
                break
            yield self._sleep()
            doc = yield self.status(deadline)
        state, report_id = self._incident_state(doc, source, line)
        last_error = doc["spool"].get("last_error")
        waited = f"{self.timeout + self.settle:g} s"
        if state is None:
            arrived = appended(find_instance(doc, source)) > base_lines
            if arrived:
                check.reason = "the server took in the test warning but detected no incident"
                check.advice = (
                    "an ignore_patterns entry of the server matches "
                    f"{line!r}: remove it, or accept that the probe cannot test reports"
                )
            else:
                check.reason = f"the test warning did not show in the server within {waited}"
                check.advice = "run the probe again; UDP may have been lost"
        elif state == "settling":
            check.reason = f"the report was still settling after {waited}"
            check.advice = (
                "the server waits settle_seconds of quiet from the instance before it reports: "
                "give the server's settle_seconds as --settle, or a longer --timeout"
            )
        else:
            reason = f"report {report_id} not delivered within {waited}"
            check.reason = f"{reason}: {last_error}" if last_error else f"{reason} (still {state})"
            check.advice = advice_for(last_error) if last_error else (
                "the Support Server is slow to answer; look at the server's log and /status"
            )

    def _incident_state(self, doc, source, line: str):
        """(report_state, report_id) of this run's incident, or (None, None) before it shows."""
        incident = (find_instance(doc, source) or {}).get("last_incident")
        if not incident or self.nonce not in (incident.get("line") or ""):
            return None, None
        return incident.get("report_state"), incident.get("report_id")

    def _progress(self, state: str, report_id: str | None, last_error: str | None) -> None:
        if state == "settling":
            self.out(
                "incident detected (warning), report settling: the server waits for "
                "settle_seconds of quiet..."
            )
        elif state == "pending":
            if last_error:
                self.out(f"report {report_id} pending: {last_error}, retrying")
            else:
                self.out(f"report {report_id} pending: being sent to the Support Server")
        elif state == "delivered":
            self.out(f"report {report_id} delivered to the Support Server")
        elif state == "written":
            self.out(f"report {report_id} written under the server's spool_dir/local/ "
                     "(stand-alone)")
        else:
            self.out(f"report {report_id or '-'} {state}")

    def _incident_outcome(self, check: _Check, state, report_id, last_error) -> bool:
        """Settle the check when the state is final; True when it is."""
        if state in ("delivered", "written"):
            check.ok = True
            return True
        if state == "pending" and last_error and is_lasting(last_error):
            check.reason = f"report {report_id} not delivered: {last_error}"
            check.advice = advice_for(last_error)
            return True
        if state == "rejected":
            check.reason = f"report {report_id} rejected: {last_error or 'by the Support Server'}"
            check.advice = advice_for(last_error or "rejected")
            return True
        if state == "folded":
            check.reason = (
                "the test warning was folded into an earlier report by the server's "
                "cooldown_seconds (the same warning was reported shortly before)"
            )
            check.advice = "run the probe again once cooldown_seconds have passed"
            return True
        if state == "unknown":
            check.reason = (
                f"report {report_id} is no longer known to the server: dropped from the spool "
                "by spool_max_bytes"
            )
            check.advice = "raise spool_max_bytes or get the Support Server to accept reports"
            return True
        return False


# --- entry points ----------------------------------------------------------------------------


def _print(line: str) -> None:
    print(line, flush=True)


def probe(reactor, options: Options, out: Callable[[str], None] = _print) -> defer.Deferred:
    """Run the probe; fires with the exit status (0 or 1)."""
    return Probe(reactor, options, out).run()


def _react_main(reactor, options: Options):
    def finish(code: int) -> None:
        if code:
            raise SystemExit(code)

    return probe(reactor, options).addCallback(finish)


def parse(argv: list[str], prog: str = PROG) -> Options:
    """The options, or exit 2 with the error (exit 0 after --help)."""
    options = Options(prog)
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{prog}: {e}\n{prog}: see {prog} --help\n")
        sys.exit(2)
    return options


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The console script: parse, run on the global reactor, exit with the status."""
    options = parse(sys.argv[1:] if argv is None else argv, prog)
    task.react(_react_main, (options,))
