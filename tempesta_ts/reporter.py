"""The delivery scheduler: the sink that sends spooled reports to the Support Server.

A report is on disk (tempesta_ts/spool.py) before its first attempt and leaves the spool only on
a 2xx, so a restart or an outage of the Support Server loses nothing. Attempts (one request each,
tempesta_ts/delivery.py) are bounded in time and in number at once, retried with backoff, and
their outcomes kept for the status page. docs/support-api.md has the contract.
"""

from __future__ import annotations

import collections
import json
import random
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from tempesta_ts.config import Config
from tempesta_ts.delivery import (
    CONNECT_TIMEOUT,
    QUOTE_BYTES,
    REFUSED_CREDENTIALS,
    REJECTED,
    Failed,
    SupportClient,
    describe_answer,
    describe_failure,
    describe_timeout,
    parse_retry_after,
)
from tempesta_ts.files import NotRegularFile
from tempesta_ts.incidents import KINDS
from tempesta_ts.log import escape, get_logger, mask_secret
from tempesta_ts.sinks import IReportSink, Outcomes, write_failed
from tempesta_ts.spool import ReportTooLarge, Spool, SpooledReport
from tempesta_ts.throttle import Throttle

#: Requests under way at once. In a crash storm (a fleet panicking together) reports must
#: not queue behind a slow Support Server: 32 at 200 ms a request deliver 160 reports a second
#: (bench/crash_storm.py).
MAX_IN_FLIGHT = 32
#: Bound on one whole attempt: connecting, sending the body, reading the answer.
RESPONSE_TIMEOUT = 30.0
BACKOFF_BASE = 1.0
#: Also the pace of retries while the credentials are refused (401, 403).
BACKOFF_CAP = 300.0
RETRY_AFTER_CAP = 3600.0
SHUTDOWN_GRACE = 5.0
#: Characters of a rejecting answer's body quoted in the log.
BODY_QUOTE = 200
#: One notice per kind of failure at most this often.
NOTICE_INTERVAL = 60.0



@dataclass(frozen=True)
class DeliveryState:
    """Where the delivery of one report stands, for the status page."""

    attempts: int = 0
    next_attempt: float = 0.0
    last_status: int | None = None
    last_error: str | None = None


class _Attempt:
    """One request in flight (internal, mutable)."""

    def __init__(self, entry: SpooledReport, started: float) -> None:
        self.entry = entry
        self.started = started
        self.deferred: defer.Deferred | None = None
        self.timer = None
        self.timed_out = False
        self.abandoned = False
        #: Its outcome was taken (its slot freed): a late result is ignored.
        self.ended = False


def about(report: Mapping) -> str:
    """What a report is about, for its delivery line: ``for 192.0.2.1: warning: WARNING in f ``."""
    try:
        incidents = report.get("incidents") or []
        address = report["instance"]["address"]
        if not incidents:
            return f"for {address} "
        kinds = [i.get("kind") for i in incidents]
        kind = min(kinds, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS))
        titles = "; ".join(escape(str(i.get("title") or i.get("line") or "")) for i in incidents)
        return f"for {address}: {kind}: {titles} "
    except (KeyError, TypeError, AttributeError):
        return ""


def about_body(body: bytes) -> str:
    """`about` of a report's JSON body (gzip is applied only on the wire)."""
    try:
        return about(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        return ""


@implementer(IReportSink)
class Reporter(service.Service):
    """The sink of a server with a Support Server: spools each report, then delivers it, as
    many at once as max_in_flight allows, retrying with backoff until a 2xx or a rejection."""

    log = get_logger(__name__)

    def __init__(
        self,
        config: Config,
        reactor,
        stats: collections.Counter,
        http_client: HTTPClient | None = None,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        retry_after_cap: float = RETRY_AFTER_CAP,
        connect_timeout: float = CONNECT_TIMEOUT,
        response_timeout: float = RESPONSE_TIMEOUT,
        shutdown_grace: float = SHUTDOWN_GRACE,
        rng: random.Random | None = None,
        spool: Spool | None = None,
        on_delivered: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = reactor
        self.stats = stats
        self.max_in_flight = max_in_flight
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.response_timeout = response_timeout
        self.shutdown_grace = shutdown_grace
        self.rng = rng if rng is not None else random.Random()
        self.spool = spool if spool is not None else Spool.of(config, stats, reactor)
        #: Called with (report_id, seconds from spooled to delivered) on each delivery.
        self.on_delivered = on_delivered
        #: The last failure, one line; None once a report is delivered again.
        self.last_error: str | None = None
        #: Its kind, one of delivery.FAILURE_KINDS (what the probe's advice goes by), or None.
        self.last_error_kind: str | None = None
        self._states: dict[str, DeliveryState] = {}
        #: report_id -> what the report is about, for the delivery line ("for HOST: kind: title ").
        self._about: dict[str, str] = {}
        self._outcomes = Outcomes()
        self._in_flight: dict[str, _Attempt] = {}
        self._wakeup = None
        self._pumping = False
        self._pump_again = False
        self._stop_waiter: defer.Deferred | None = None
        self._failing = False
        self._notices = Throttle(NOTICE_INTERVAL)
        self._http_client = http_client
        self._connect_timeout = connect_timeout
        self.client = SupportClient(config, reactor, http_client, max_connections=max_in_flight,
                                    connect_timeout=connect_timeout)
        self.host, self.url = self.client.host, self.client.url

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded API key and CA (re-read from their files); the next attempts use
        them, those under way finish with the old. Raises ConfigError (a CA bundle that does
        not parse) before anything changes."""
        client = SupportClient(config, self.clock, self._http_client,
                               max_connections=self.max_in_flight,
                               connect_timeout=self._connect_timeout)
        old, self.client, self.config = self.client, client, config
        old.close()

    # -- status ---------------------------------------------------------------------------

    @property
    def states(self) -> Mapping[str, DeliveryState]:
        """Delivery state of every report pending, by report_id."""
        return dict(self._states)

    def state_of(self, report_id: str) -> str:
        """One word for a report: pending, delivered, rejected, or unknown (dropped from the
        spool, or ended too long ago to remember)."""
        if report_id in self._states or self.spool.get(report_id) is not None:
            return "pending"
        return self._outcomes.get(report_id)

    def attempts_of(self, report_id: str) -> tuple[int | None, str | None]:
        """Attempts made to deliver a report and its last failure (the operators' pages);
        (None, None) for one not known."""
        state = self._states.get(report_id)
        if state is not None:
            return state.attempts, state.last_error
        return self._outcomes.attempts(report_id), None

    @property
    def in_flight(self) -> int:
        """Requests under way."""
        return len(self._in_flight)

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        waiting = self.spool.open()
        super().startService()
        self._stop_waiter = None
        if waiting:
            self.log.info(
                "{count} reports ({size} bytes) wait in the spool from a previous run; "
                "sending them",
                count=len(waiting),
                size=self.spool.bytes,
            )
        self._pump()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._cancel_wakeup()
        if not self._in_flight:
            return self._close()
        waiter = defer.Deferred()
        self._stop_waiter = waiter
        grace = self.clock.callLater(self.shutdown_grace, self._abandon_in_flight)

        def finish(_):
            if grace.active():
                grace.cancel()
            return self._close()

        return waiter.addCallback(finish)

    def _abandon_in_flight(self) -> None:
        for attempt in list(self._in_flight.values()):
            attempt.abandoned = True
            self._cancel(attempt)

    def _close(self) -> defer.Deferred:
        self.spool.release()
        return self.client.close()

    # -- submit -----------------------------------------------------------------------------

    def submit(self, report: dict) -> defer.Deferred:
        """Fire with the SpooledReport once the report is on disk, or held in memory while the
        disk refuses it (delivered from there all the same); its delivery begins."""
        try:
            entry = self.spool.write(report)
        except ReportTooLarge:
            return defer.fail()  # Spool.write counted and logged it
        except (OSError, ValueError) as e:
            write_failed(self.log, self.stats, report.get("report_id"), self.spool.directory, e)
            return defer.fail()
        self._states.setdefault(entry.report_id, DeliveryState())
        self._about[entry.report_id] = about(report)
        self._pump()
        return defer.succeed(entry)

    # -- scheduling -------------------------------------------------------------------------

    def _pump(self) -> None:
        # A request may complete synchronously (and pump again) inside _start.
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        if not self.running:
            return
        self._cancel_wakeup()
        now = self.clock.seconds()
        earliest = None
        pending = self.spool.pending()
        for entry in pending:
            if len(self._in_flight) >= self.max_in_flight:
                # A completion pumps again.
                return
            if entry.report_id in self._in_flight:
                continue
            state = self._states.setdefault(entry.report_id, DeliveryState())
            if state.next_attempt <= now:
                self._start(entry)
            elif earliest is None or state.next_attempt < earliest:
                earliest = state.next_attempt
        if len(self._states) > len(pending):
            live = {e.report_id for e in pending} | set(self._in_flight)
            for report_id in [r for r in self._states if r not in live]:
                del self._states[report_id]
                self._about.pop(report_id, None)
        if earliest is not None:
            self._wakeup = self.clock.callLater(max(0.0, earliest - now), self._pump)

    def _cancel_wakeup(self) -> None:
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None

    def _backoff(self, attempts: int) -> float:
        # Exponential with full jitter: spreads the retries of many reports after an outage.
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** min(attempts - 1, 32))
        return self.rng.uniform(0, ceiling)

    # -- one attempt ------------------------------------------------------------------------

    def _start(self, entry: SpooledReport) -> None:
        report_id = entry.report_id
        state = self._states[report_id]
        self._states[report_id] = state = replace(state, attempts=state.attempts + 1)
        try:
            body = self.spool.read(entry)
        except NotRegularFile:
            self.stats["spool_errors"] += 1
            self.log.error(
                "Report {report_id} not sent: {path} is now a symbolic link or not a regular "
                "file; it is left there, never sent", report_id=report_id, path=entry.path)
            self.spool.forget(entry)
            self._states.pop(report_id, None)
            return
        except FileNotFoundError:
            self.log.warn(
                "Report {report_id} vanished from {path}", report_id=report_id, path=entry.path
            )
            self.spool.forget(entry)
            self._states.pop(report_id, None)
            return
        except OSError as e:
            failed = Failed("other", f"cannot read {entry.path}: {e.strerror}", "spool")
            self._retry(entry, failed, None, None)
            return
        if report_id not in self._about:
            # Spooled by an earlier run: what it is about is read from the body once.
            self._about[report_id] = about_body(body)
        attempt = _Attempt(entry, self.clock.seconds())
        self._in_flight[report_id] = attempt
        d = self.client.post(report_id, body)
        attempt.deferred = d
        attempt.timer = self.clock.callLater(self.response_timeout, self._time_out, attempt)
        d.addBoth(self._finished, attempt)

    def _time_out(self, attempt: _Attempt) -> None:
        attempt.timed_out = True
        self._cancel(attempt)

    def _cancel(self, attempt: _Attempt) -> None:
        try:
            attempt.deferred.cancel()
        except Exception:
            self.log.failure("Cancelling the request of report {report_id} failed",
                             report_id=attempt.entry.report_id)
        if not attempt.ended:
            # A request that ignores its cancellation must not keep its slot for ever.
            self._finished(Failure(defer.CancelledError()), attempt)

    def _finished(self, result, attempt: _Attempt) -> None:
        if attempt.ended:
            return
        attempt.ended = True
        entry = attempt.entry
        try:
            if self._in_flight.get(entry.report_id) is attempt:
                del self._in_flight[entry.report_id]
            if attempt.timer is not None and attempt.timer.active():
                attempt.timer.cancel()
            if isinstance(result, Failure):
                self._failed(attempt, result)
            else:
                self._answered(attempt, *result)
        except Exception:
            self.log.failure(
                "Unexpected error after sending report {report_id}", report_id=entry.report_id
            )
        if self._stop_waiter is not None:
            if not self._in_flight:
                waiter, self._stop_waiter = self._stop_waiter, None
                waiter.callback(None)
        else:
            self._pump()

    def _failed(self, attempt: _Attempt, failure: Failure) -> None:
        entry = attempt.entry
        if attempt.abandoned:
            self.log.info(
                "Stopped sending report {report_id} at shutdown; it stays in the spool",
                report_id=entry.report_id,
            )
            return
        if attempt.timed_out:
            failed = describe_timeout(self.host, self.client.port, self.response_timeout)
        else:
            failed = describe_failure(failure, self.host, self.client.port)
        self._retry(entry, failed, None, None)

    def _answered(self, attempt: _Attempt, status: int, headers: Headers, quote: bytes) -> None:
        entry = attempt.entry
        now = self.clock.seconds()
        if 200 <= status < 300:
            self._delivered(entry, status, now)
        elif status in REJECTED:
            self._rejected(entry, status, quote)
        else:
            retry_after = parse_retry_after(
                (headers.getRawHeaders(b"retry-after") or [None])[0], now
            )
            failed = describe_answer(status, self.config.support_client_id)
            self._retry(entry, failed, status, retry_after,
                        slowest=status in REFUSED_CREDENTIALS)

    def _delivered(self, entry: SpooledReport, status: int, now: float) -> None:
        state = self._states.pop(entry.report_id, DeliveryState())
        try:
            self.spool.delivered(entry)
        except OSError as e:
            # It would be sent again after a restart; the Idempotency-Key makes that harmless.
            self.log.error("Cannot remove delivered report {path}: {reason}", path=entry.path,
                           reason=e.strerror)
            self.spool.forget(entry)
        self.stats["reports_delivered"] += 1
        self._outcomes.ended(entry.report_id, "delivered", state.attempts)
        latency = now - entry.created
        if self._failing:
            self._failing = False
            self.log.info("The Support Server accepts reports again")
        self.last_error = self.last_error_kind = None
        self.log.info(
            "Report {report_id} {about}delivered (HTTP {status}, attempt {attempts}, "
            "{latency:.1f} s after it was spooled)",
            report_id=entry.report_id,
            about=self._about.pop(entry.report_id, ""),
            status=status,
            attempts=state.attempts,
            latency=latency,
        )
        if self.on_delivered is not None:
            try:
                self.on_delivered(entry.report_id, latency)
            except Exception:
                self.log.failure("on_delivered failed")

    def _rejected(self, entry: SpooledReport, status: int, quote: bytes) -> None:
        state = self._states.pop(entry.report_id, DeliveryState())
        self._about.pop(entry.report_id, None)
        path = self.spool.reject(entry)
        self.stats["reports_rejected"] += 1
        self._outcomes.ended(entry.report_id, "rejected", state.attempts)
        self.last_error = f"HTTP {status}: report {entry.report_id} rejected"
        self.last_error_kind = "rejected"
        self.log.error(
            "The Support Server rejected report {report_id} with HTTP {status}: {answer}; "
            "it is kept in {path} and will not be sent again",
            report_id=entry.report_id,
            status=status,
            answer=self._quote(quote),
            path=path,
        )

    def _retry(
        self,
        entry: SpooledReport,
        failed: Failed,
        status: int | None,
        retry_after: float | None,
        slowest: bool = False,
    ) -> None:
        why = escape(self._scrub(failed.why))
        now = self.clock.seconds()
        state = self._states.get(entry.report_id, DeliveryState(attempts=1))
        delay = self.backoff_cap if slowest else self._backoff(state.attempts)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        self._states[entry.report_id] = replace(
            state, next_attempt=now + delay, last_status=status, last_error=why
        )
        self.last_error, self.last_error_kind = why, failed.kind
        self._failing = True
        self.stats["reports_retried"] += 1
        held = self._notices.hit(failed.cause, now)
        if held is None:
            return
        # What the operator must fix is an error; what may pass is a warning.
        level = self.log.error if failed.cause in ("tls-verify", "credentials") else self.log.warn
        level(
            "Report {report_id} not delivered: {why}; it stays in the spool, next attempt in "
            "{delay:.1f} s{held_back}",
            report_id=entry.report_id,
            why=why,
            delay=delay,
            attempts=state.attempts,
            status=status,
            client_id=self.config.support_client_id,
            held=held,
            held_back=f" ({held} similar failures since the last notice)" if held else "",
        )

    def _scrub(self, text: str, cut: bool = False) -> str:
        # Whatever a server echoes back, no piece of the key reaches a log line.
        return mask_secret(text, self.config.support_api_key, cut)

    def _quote(self, quote: bytes) -> str:
        # The key is masked in all that was read before the quote is cut to BODY_QUOTE.
        text = self._scrub(quote.decode("utf-8", "replace"), cut=len(quote) >= QUOTE_BYTES)
        if len(text) > BODY_QUOTE:
            text = self._scrub(text[:BODY_QUOTE], cut=True)
        return escape(text)
