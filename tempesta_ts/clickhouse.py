"""Every log line and every reported incident into ClickHouse, where a fleet's logs are searched.

Rows go over ClickHouse's HTTP interface (``INSERT ... FORMAT JSONEachRow``) in batches, each
second or as soon as BATCH_ROWS rows wait, one request at a time. They wait in queues bounded in
bytes: while ClickHouse is away they are kept, then the oldest are dropped and counted. Ingest
never waits on ClickHouse: an observer only formats and queues a row. The database and tables are
made when missing, with types that Debian 12's ClickHouse (18.16) knows as well as current
releases. docs/clickhouse.md has the schema and queries.
"""

from __future__ import annotations

import json
import zlib
from collections import deque
from datetime import datetime, timezone
from typing import Any, Sequence

import treq
from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import inlineCallbacks
from twisted.python.failure import Failure
from twisted.web.client import Agent

from tempesta_ts.buffers import Instance
from tempesta_ts.config import Config
from tempesta_ts.delivery import BytesProducer, QuietConnectionPool
from tempesta_ts.log import get_logger
from tempesta_ts.netconsole import LogLine
from tempesta_ts.throttle import Throttle

#: A batch is sent once this many rows wait, or at the next tick.
BATCH_ROWS = 10_000
#: What waited while an insert was under way goes in one insert, up to this many rows: a
#: backlog makes fewer and larger inserts, which ClickHouse takes faster. Bounded, as the body
#: is made (joined, compressed) in one go, between two reads of the UDP socket.
MAX_BATCH_ROWS = 50_000
#: zlib level of the request bodies: kernel log rows shrink about 14 times at level 1, for
#: little CPU (ClickHouse 18.16 and later take Content-Encoding: deflate).
COMPRESS_LEVEL = 1
FLUSH_SECONDS = 1.0
#: After a failed request the next waits this long, doubled each failure up to RETRY_MAX_SECONDS.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
#: No answer within this long is a failed request.
REQUEST_SECONDS = 30.0
#: Idle connections to ClickHouse are closed after this long.
IDLE_CONNECTION_SECONDS = 2.0
#: At shutdown, how long what waits may take to go.
STOP_SECONDS = 5.0
#: Memory a queued row takes beyond its characters: the str object and its deque slot.
ROW_OVERHEAD = 57
#: Incidents are few: their queue has a bound of its own, so that a flood of lines never
#: pushes them out.
INCIDENT_QUEUE_BYTES = 8 * 1024 * 1024
#: Instances' addresses kept as JSON strings; past it the cache starts again.
MAX_NAMES = 65536
#: Characters of ClickHouse's answer kept for the log.
QUOTE_CHARS = 300

#: Both tables are read as "one instance, a time range": sorted by instance then time, in monthly
#: partitions that an operator drops to free space. DateTime('UTC') and a microseconds column
#: rather than DateTime64 (ClickHouse 20.1), String rather than LowCardinality (experimental in
#: 18.16), the PARTITION BY / ORDER BY syntax (1.1.54310).
KERNEL_LOG_COLUMNS = """(
    received_at DateTime('UTC'),
    received_us UInt32,
    instance String,
    collector String,
    level Nullable(UInt8),
    seq Nullable(UInt64),
    kernel_time_us Nullable(UInt64),
    text String
)"""
INCIDENTS_COLUMNS = """(
    received_at DateTime('UTC'),
    received_us UInt32,
    instance String,
    collector String,
    kind String,
    title String,
    module Nullable(String),
    fingerprint String,
    report_id String,
    line String,
    seq Nullable(UInt64),
    kernel_time_us Nullable(UInt64)
)"""
ENGINE = (
    "ENGINE = MergeTree() PARTITION BY toYYYYMM(received_at) "
    "ORDER BY (instance, received_at, received_us)"
)


def schema(database: str) -> list[str]:
    """The statements that make the database and its tables when missing."""
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        f"CREATE TABLE IF NOT EXISTS {database}.kernel_log {KERNEL_LOG_COLUMNS} {ENGINE}",
        f"CREATE TABLE IF NOT EXISTS {database}.incidents {INCIDENTS_COLUMNS} {ENGINE}",
    ]


#: A str as a JSON string (C code; non-ASCII left as it is, sent as UTF-8).
_string = json.encoder.encode_basestring  # type: ignore[attr-defined]


#: Sequence numbers and kernel times are UInt64: a number past it (no kernel's) is sent as null,
#: lest ClickHouse refuse the whole batch again and again.
U64 = 2**64


def line_row(instance: str, collector: str, line: LogLine) -> str:
    """A kernel_log row as a line of JSONEachRow; `instance` and `collector` already JSON."""
    at = line.received_at
    seconds = int(at)
    seq, time_us = line.seq, line.kernel_time_us
    return (
        f'{{"received_at":{seconds},"received_us":{int((at - seconds) * 1e6)},'
        f'"instance":{instance},"collector":{collector},'
        f'"level":{"null" if line.level is None else line.level},'
        f'"seq":{seq if seq is not None and 0 <= seq < U64 else "null"},'
        f'"kernel_time_us":{time_us if time_us is not None and 0 <= time_us < U64 else "null"},'
        f'"text":{_string(line.text)}}}\n'
    )


def _epoch(text: Any) -> float | None:
    """The report's UTC time (``2026-11-23T10:00:05.123Z``) as epoch seconds."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc).timestamp()


def incident_rows(report: dict, now: float) -> list[str]:
    """The incidents rows of a finished report, as lines of JSONEachRow."""
    address = report["instance"]["address"]
    collector = report["collector"]["hostname"]
    rows = []
    for incident in report["incidents"]:
        at = _epoch(incident.get("received_at")) or _epoch(report.get("created_at")) or now
        # Milliseconds in the report: rounded so that 0.123 stays 123000.
        micros = round(at * 1e6)
        row = {
            "received_at": micros // 1_000_000,
            "received_us": micros % 1_000_000,
            "instance": address,
            "collector": collector,
            "kind": incident["kind"],
            "title": incident["title"],
            "module": incident.get("module"),
            "fingerprint": incident["fingerprint"],
            "report_id": report["report_id"],
            "line": incident["line"],
            "seq": incident.get("seq"),
            "kernel_time_us": incident.get("kernel_time_us"),
        }
        rows.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    return rows


def compress_body(data: bytes) -> bytes:
    """A request body compressed for Content-Encoding: deflate (zlib)."""
    return zlib.compress(data, COMPRESS_LEVEL)


class RowQueue:
    """Rows waiting for ClickHouse, bounded by the memory they take; the oldest go first."""

    __slots__ = ("max_bytes", "rows", "bytes", "stats")

    def __init__(self, max_bytes: int, stats) -> None:
        self.max_bytes = max_bytes
        self.rows: deque[str] = deque()
        self.bytes = 0
        self.stats = stats

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: str) -> None:
        """Queue a row; past the bound the oldest rows are dropped and counted."""
        self.rows.append(row)
        self.bytes += len(row) + ROW_OVERHEAD
        if self.bytes > self.max_bytes:
            self._drop()

    def take(self, count: int) -> list[str]:
        """Up to `count` of the oldest rows, out of the queue."""
        rows, popleft = [], self.rows.popleft
        for _ in range(min(count, len(self.rows))):
            rows.append(popleft())
        self.bytes -= sum(map(len, rows)) + ROW_OVERHEAD * len(rows)
        return rows

    def put_back(self, rows: Sequence[str]) -> None:
        """Rows taken and not sent: first again, within the bound."""
        self.rows.extendleft(reversed(rows))
        self.bytes += sum(map(len, rows)) + ROW_OVERHEAD * len(rows)
        self._drop()

    def clear(self) -> int:
        """Drop every row; how many there were."""
        count = len(self.rows)
        self.rows.clear()
        self.bytes = 0
        return count

    def _drop(self) -> None:
        rows = self.rows
        while self.bytes > self.max_bytes and rows:
            self.bytes -= len(rows.popleft()) + ROW_OVERHEAD
            self.stats["clickhouse_rows_dropped"] += 1


class ClickHouseError(Exception):
    """ClickHouse answered with an error (its status and the start of its message)."""


class ClickHouse(service.Service):
    """Sends every log line (`lines_added`) and every reported incident (`report_made`) to
    ClickHouse's kernel_log and incidents tables."""

    log = get_logger(__name__)

    def __init__(
        self,
        url: str,
        database: str,
        user: str | None,
        password: str | None,
        collector: str,
        clock,
        http_client: HTTPClient,
        stats,
        max_bytes: int,
        *,
        batch_rows: int = BATCH_ROWS,
        max_batch_rows: int = MAX_BATCH_ROWS,
        interval: float = FLUSH_SECONDS,
        retry_max: float = RETRY_MAX_SECONDS,
        pool=None,
    ) -> None:
        self.url = url
        self.database = database
        self.collector = collector
        self.clock = clock
        self.http = http_client
        self.stats = stats
        self.batch_rows = batch_rows
        self.max_batch_rows = max(batch_rows, max_batch_rows)
        self.interval = interval
        self.retry_max = retry_max
        self._pool = pool
        # Basic authentication: the password goes in no URL (ClickHouse logs its queries').
        self._auth = (user or "default", password or "") if user or password else None
        self._password = password
        self._collector = _string(collector)
        #: Instances' addresses as JSON strings.
        self._names: dict[str, str] = {}
        self._lines = RowQueue(max_bytes, stats)
        self._incidents = RowQueue(min(max_bytes, INCIDENT_QUEUE_BYTES), stats)
        self._schema = schema(database)
        self._ready = False
        self._sending: defer.Deferred | None = None
        self._kick: Any = None
        self._failures = 0
        self._dropped_at_failure = 0
        self._retry_at = 0.0
        self._throttle = Throttle(60.0)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = clock

    @classmethod
    def of(cls, config: Config, reactor, stats, collector: str,
           http_client: HTTPClient | None = None) -> ClickHouse | None:
        """The sink as configured, or None when clickhouse_url is not set."""
        if config.clickhouse_url is None:
            return None
        pool = None
        if http_client is None:
            pool = QuietConnectionPool(reactor, persistent=True)
            # Closed before ClickHouse's keep_alive_timeout (3 s by default) would, so that an
            # insert never goes out on a connection the server is closing.
            pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
            http_client = HTTPClient(Agent(reactor, pool=pool), data_to_body_producer=BytesProducer)
        return cls(
            config.clickhouse_url, config.clickhouse_database, config.clickhouse_user,
            config.clickhouse_password, collector, reactor, http_client, stats,
            config.clickhouse_queue_max_bytes, pool=pool,
        )

    @property
    def queued_rows(self) -> int:
        """Rows waiting to be sent, both tables."""
        return len(self._lines) + len(self._incidents)

    def lines_added(self, instance: Instance, lines: Sequence[LogLine]) -> None:
        """The registry's every-line observer: a kernel_log row per line, queued."""
        try:
            address = self._names.get(instance.address)
            if address is None:
                if len(self._names) >= MAX_NAMES:
                    self._names.clear()
                address = self._names[instance.address] = _string(instance.address)
            collector, queue = self._collector, self._lines
            for line in lines:
                queue.append(line_row(address, collector, line))
            if len(queue) >= self.batch_rows and self._sending is None and self._kick is None:
                # A full batch goes now rather than at the next tick.
                self._kick = self.clock.callLater(0, self._kicked)
        except Exception:
            self._failed("line")

    def submit(self, report: dict) -> None:
        """As one of the pipeline's report sinks: the report's incidents become rows."""
        self.report_made(report)

    def report_made(self, report: dict) -> None:
        """A finished report: an incidents row per incident in it, queued."""
        try:
            for row in incident_rows(report, self.clock.seconds()):
                self._incidents.append(row)
        except Exception:
            self._failed("report")

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    @inlineCallbacks
    def stopService(self):
        """What waits is sent, for at most STOP_SECONDS; the rest is counted as dropped."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._kick is not None and self._kick.active():
            self._kick.cancel()
        self._kick = None
        # The send under way ends, then one more takes what still waits (failure or not).
        deadline = self.clock.seconds() + STOP_SECONDS
        last = False
        while True:
            if self._sending is None:
                if last or not self.queued_rows:
                    break
                last = True
                self._start(whole=True)
                continue
            sending = self._sending
            timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), sending.cancel)
            try:
                yield sending
            finally:
                if timer.active():
                    timer.cancel()
        left = self._lines.clear() + self._incidents.clear()
        if left:
            self.stats["clickhouse_rows_dropped"] += left
            self.log.warn(
                "Stopped with {rows} rows not sent to ClickHouse at {url}: dropped",
                rows=left, url=self.url,
            )
        if self._pool is not None:
            yield self._pool.closeCachedConnections()

    def _kicked(self) -> None:
        self._kick = None
        self._tick(whole=False)

    def _tick(self, whole: bool = True) -> None:
        """Send what waits (whole: the last batch may be short), unless a send is under way or
        a failure asks to wait."""
        try:
            if not self.running or self._sending is not None:
                return
            # The first tick makes the tables, rows or not: a wrong URL or password shows at once.
            if self.clock.seconds() < self._retry_at or (self._ready and not self.queued_rows):
                return
            self._start(whole)
        except Exception:
            self._failed("timer")

    def _start(self, whole: bool) -> None:
        self._sending = self._send(whole)
        self._sending.addBoth(self._sent)

    @inlineCallbacks
    def _send(self, whole: bool):
        if not self._ready:
            for statement in self._schema:
                yield self._post(statement)
            self._ready = True
        for table, queue in (("incidents", self._incidents), ("kernel_log", self._lines)):
            short_sent = not whole
            while len(queue):
                if len(queue) < self.batch_rows:
                    # At most one short batch a tick: rows that came meanwhile wait for the
                    # next, so that ClickHouse gets few and large inserts.
                    if short_sent:
                        break
                    short_sent = True
                rows = queue.take(self.max_batch_rows)
                body = compress_body("".join(rows).encode("utf-8", "backslashreplace"))
                try:
                    yield self._post(
                        f"INSERT INTO {self.database}.{table} FORMAT JSONEachRow", body
                    )
                except BaseException:
                    queue.put_back(rows)
                    raise
                self.stats["clickhouse_rows_sent"] += len(rows)

    @inlineCallbacks
    def _post(self, query: str, body: bytes | None = None):
        """One request: the statement, or an INSERT's query with its rows as the (compressed)
        body."""
        if body is None:
            params, headers, body = None, None, query.encode("utf-8")
        else:
            params, headers = {"query": query}, {"Content-Encoding": "deflate"}
        response = yield self.http.post(
            self.url + "/", params=params, headers=headers, data=body, auth=self._auth,
            timeout=REQUEST_SECONDS, reactor=self.clock,
        )
        answer = yield treq.content(response)
        if response.code != 200:
            text = answer.decode("utf-8", "replace").strip().splitlines()
            raise ClickHouseError(f"HTTP {response.code}: {text[0][:QUOTE_CHARS] if text else ''}")

    def _sent(self, result) -> None:
        self._sending = None
        try:
            now = self.clock.seconds()
            dropped = self.stats["clickhouse_rows_dropped"]
            if not isinstance(result, Failure):
                if self._failures:
                    self.log.info(
                        "ClickHouse at {url} takes rows again after {failures} failed requests; "
                        "{dropped} rows dropped meanwhile",
                        url=self.url, failures=self._failures,
                        dropped=dropped - self._dropped_at_failure,
                    )
                self._failures = 0
                self._retry_at = 0.0
                return
            # The tables are made again before the next insert: the server may be a new one.
            self._ready = False
            self.stats["clickhouse_insert_errors"] += 1
            if not self._failures:
                self._dropped_at_failure = dropped
            self._failures += 1
            delay = min(self.retry_max, RETRY_FIRST_SECONDS * 2 ** min(self._failures - 1, 16))
            self._retry_at = now + delay
            held = self._throttle.hit("send", now)
            if held is not None:
                self.log.warn(
                    "ClickHouse at {url} failed: {reason}; {queued} rows wait, {dropped} dropped "
                    "so far; next try in {delay:g} s ({held} more failures held back)",
                    url=self.url, reason=self._reason(result), queued=self.queued_rows,
                    dropped=dropped, delay=delay, held=held,
                )
        except Exception:
            self._failed("send")

    def _reason(self, failure: Failure) -> str:
        # twisted.web wraps what failed a request (ResponseNeverReceived...) in a list.
        inner = getattr(failure.value, "reasons", None)
        causes = [f.value for f in inner] if inner else [failure.value]
        if any(isinstance(cause, defer.CancelledError) for cause in causes):
            reason = "no answer in time"
        else:
            reason = "; ".join(str(cause) or type(cause).__name__ for cause in causes)
        if self._password:
            reason = reason.replace(self._password, "********")
        return reason

    def _failed(self, what: str) -> None:
        """Count and log (once per burst) an unexpected failure; call from an except."""
        self.stats["clickhouse_errors"] += 1
        held = self._throttle.hit(("failure", what), self.clock.seconds())
        if held is not None:
            self.log.failure(
                "Failed to pass a {what} to ClickHouse ({held} more failures held back)",
                what=what, held=held,
            )
