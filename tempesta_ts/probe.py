"""tempesta-ts-probe: check a running server end to end, as an operator would by hand.

It sends test netconsole datagrams (plain and extended) and a system information document to
the server from this machine, confirms through /status.json that the server took them in and,
with --incident, follows a test WARNING's report until it is delivered or written.
docs/probe.md says what each message means and what to do.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.internet import defer, error, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from tempesta_ts import __version__
from tempesta_ts.hosts import host_port
from tempesta_ts.probe_messages import (
    Datagrams,
    DocumentSender,
    document,
    extended_datagram,
    make_nonce,
    plain_datagram,
    sequence_number,
    test_warning,
)
from tempesta_ts.probe_options import PROG, Options
from tempesta_ts.probe_status import (
    ProbeFailed,
    advice_for,
    appended,
    counter,
    delivery_failure,
    find_instance,
    is_lasting,
    request_failure,
    same_address,
)

#: Where the probe finds the server's status_token (the server reads the same variable).
STATUS_TOKEN_ENV = "TEMPESTA_TS_STATUS_TOKEN"
#: Between two reads of /status.json (each costs the server about 0.2 s at 10,000 instances).
POLL_SECONDS = 0.25
#: One read of /status.json waits at most this long (and never past the step's deadline).
REQUEST_SECONDS = 10.0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


@dataclass
class _Check:
    """One thing the probe confirms: what it is, whether it worked, and if not why."""

    name: str
    ok: bool = False
    reason: str | None = None
    advice: str | None = None


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
        status_token: str | None = None,
    ) -> None:
        self.reactor = reactor
        #: The server's status_token, for a /status.json not on loopback (else 403).
        self._headers = {"Authorization": f"Bearer {status_token}"} if status_token else None
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
        self._datagrams = Datagrams()
        self._seq = sequence_number(reactor.seconds())

    @property
    def _shown(self) -> str:
        return host_port(self.host, self.port)

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
            response = yield self._http.get(self.url, headers=self._headers, reactor=self.reactor,
                                            timeout=remaining)
            # treq's timeout ends with the headers; a body that stalls is bounded here.
            remaining = max(0.1, deadline - self.reactor.seconds())
            body = yield response.content().addTimeout(remaining, self.reactor)
        except Exception:
            raise request_failure(self.url, Failure()) from None
        if response.code == 403:
            raise ProbeFailed(
                f"{self.url} answered HTTP 403: it shows log text only to loopback clients "
                "and to those that give the server's status_token",
                f"run the probe with ${STATUS_TOKEN_ENV} set to the server's status_token, or "
                "on the server's host",
            )
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
        sender = DocumentSender(data)
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
                last_error, kind = delivery_failure(doc)
                shown = (state, report_id, last_error if state == "pending" else None)
                if state is not None and shown != seen:
                    seen = shown
                    self._progress(state, report_id, last_error)
                done = self._incident_outcome(check, state, report_id, last_error, kind)
                if done:
                    return
            if self.reactor.seconds() >= deadline:
                break
            yield self._sleep()
            doc = yield self.status(deadline)
        state, report_id = self._incident_state(doc, source, line)
        last_error, kind = delivery_failure(doc)
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
            check.advice = advice_for(kind) if last_error else (
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

    def _incident_outcome(self, check: _Check, state, report_id, last_error, kind) -> bool:
        """Settle the check when the state is final; True when it is."""
        if state in ("delivered", "written"):
            check.ok = True
            return True
        if state == "pending" and last_error and is_lasting(kind):
            check.reason = f"report {report_id} not delivered: {last_error}"
            check.advice = advice_for(kind)
            return True
        if state == "rejected":
            check.reason = f"report {report_id} rejected: {last_error or 'by the Support Server'}"
            check.advice = advice_for("rejected")
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




def _print(line: str) -> None:
    print(line, flush=True)


def probe(reactor, options: Options, out: Callable[[str], None] = _print) -> defer.Deferred:
    """Run the probe; fires with the exit status (0 or 1)."""
    return Probe(reactor, options, out, status_token=os.environ.get(STATUS_TOKEN_ENV)).run()


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
