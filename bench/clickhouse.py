"""The ClickHouse sink against a real local server: does it keep up with 50,000 lines a second,
and what does a line cost?

Two parts:
- CPU per line in process: the every-line observer (a row formatted and queued) and the
  making of the request body, on lines as the buffer registry gives them;
- keeping up: the server's buffer registry fed --rate lines a second (in slices every
  millisecond, as reads of the socket would) for --seconds, with the sink sending to a clickhouse-server of
  its own on loopback; rows sent, dropped and waiting, the inserts made, the rows ClickHouse
  counts, and the process's CPU beside the same run without the sink.

    python bench/clickhouse.py [--rate 50000] [--seconds 10] [--url http://127.0.0.1:8123]
    python bench/clickhouse.py --instructions     # the in-process part counted by valgrind

Without --url it starts the installed clickhouse-server (as the tests do, from a copy of its
packaged config on free loopback ports) and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from functools import partial

import treq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, task  # noqa: E402

from tempesta_ts.buffers import BufferRegistry  # noqa: E402
from tempesta_ts.clickhouse import BATCH_ROWS, ClickHouse, compress_body  # noqa: E402
from tempesta_ts.config import Config  # noqa: E402
from tempesta_ts.incidents import Rules  # noqa: E402
from tempesta_ts.metrics import KNOWN_STATS  # noqa: E402

# The ordinary lines of bench/hotpath.py, in turn.
LINES = [
    b"tfw_http_msg_process: [tempesta fw] request processed for client 192.0.2.77 status 200",
    b"[tempesta fw] Starting virtual host 'default' listening on 0.0.0.0:443, 64 worker threads",
    b"nf_conntrack: nf_conntrack: table full, dropping packet from 192.0.2.77 to 198.51.100.5",
    b"TCP: request_sock_TCP: Possible SYN flooding on port 443. Sending cookies.  Check SNMP counters.",
]
INSTANCES = 100


def gram(seq: int) -> bytes:
    """The extended-format datagram of an instance's seq-th line."""
    return b"6,%d,%d,-;%s\n" % (seq, seq * 1000, LINES[seq % 4])


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def registry_with(sink) -> BufferRegistry:
    """The registry as the service wires it: the tracker's line filter, and the sink (if any)."""
    stats = dict.fromkeys(KNOWN_STATS, 0)
    registry = BufferRegistry(INSTANCES + 10, 1000, 2 * 1024 * 1024, stats)
    registry.line_filter = Rules().line_filter
    registry.observers.append(lambda instance, lines: None)
    if sink is not None:
        registry.every_line.append(sink.lines_added)
    return registry


def work(count: int, with_sink: bool) -> None:
    """Lines through the registry, and with the sink their rows and request bodies (no sending)."""
    sink = None
    if with_sink:
        sink = ClickHouse("http://127.0.0.1:1", "bench", None, None, "bench", task.Clock(), None,
                          Counter(), 1 << 40, batch_rows=10**12)
    registry = registry_with(sink)
    now = 1_800_000_000.0
    for i in range(count):
        registry.receive_datagram(f"127.1.0.{i % INSTANCES + 1}", gram(i // INSTANCES), now)
    if sink is not None:
        rows = list(sink._lines.rows)
        for n in range(0, len(rows), BATCH_ROWS):
            compress_body("".join(rows[n : n + BATCH_ROWS]).encode("utf-8", "backslashreplace"))


def counted(count: int, with_sink: bool) -> int:
    """Instructions valgrind counts for work(count, with_sink) in a process of its own."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         os.path.abspath(__file__), "--work", json.dumps([count, with_sink])],
        capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), timeout=1200,
        check=True,
    ).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def instructions(small: int, large: int) -> None:
    """The sink's instructions a line: with and without it, at two sizes (start-up cancels)."""
    with_sink = counted(large, True) - counted(small, True)
    without = counted(large, False) - counted(small, False)
    lines = large - small
    print("instructions a line, in process (valgrind):")
    print(f"  registry without the sink         {without / lines:8.0f}")
    print(f"  the sink (row, queue, body)       {(with_sink - without) / lines:8.0f}")


def in_process(count: int) -> None:
    """CPU per line of the observer and of the body, no sending."""
    grams = [(f"127.1.0.{i % INSTANCES + 1}", gram(i // INSTANCES)) for i in range(count)]
    timings = {}
    for name in ("without the sink", "with the sink"):
        sink = None
        if name == "with the sink":
            sink = ClickHouse("http://127.0.0.1:1", "bench", None, None, "bench", task.Clock(), None,
                              Counter(), 1 << 40, batch_rows=10**12)
        registry = registry_with(sink)
        now = time.time()
        started = time.process_time()
        for address, data in grams:
            registry.receive_datagram(address, data, now)
        timings[name] = (time.process_time() - started) / count * 1e6
    rows = list(sink._lines.rows)
    started = time.process_time()
    for n in range(0, len(rows), BATCH_ROWS):
        compress_body("".join(rows[n : n + BATCH_ROWS]).encode("utf-8", "backslashreplace"))
    body = (time.process_time() - started) / len(rows) * 1e6
    print(f"in process, {count} lines from {INSTANCES} instances:")
    print(f"  registry without the sink      {timings['without the sink']:5.2f} us a line")
    print(f"  registry with the sink         {timings['with the sink']:5.2f} us a line "
          f"(+{timings['with the sink'] - timings['without the sink']:.2f}: unpack, format, queue)")
    print(f"  request body (join, compress)  {body:5.2f} us a line")
    print(f"  row size                       {sum(map(len, rows)) / len(rows):5.0f} bytes of JSON")


def timed(sink, reactor) -> list[tuple[int, float]]:
    """(rows, seconds) of each insert the sink makes."""
    inserts = []
    post = sink._post

    def wrapped(query, body=None):
        started = reactor.seconds()
        d = post(query, body)
        if body is not None:
            rows = zlib.decompress(body).count(b"\n")
            d.addCallback(lambda r: inserts.append((rows, reactor.seconds() - started)) or r)
        return d

    sink._post = wrapped
    return inserts


@defer.inlineCallbacks
def keep_up(reactor, url: str, rate: int, seconds: float, query):
    """Feed `rate` lines a second to the registry for `seconds`, with and without the sink."""
    results = {}
    for mode in ("without the sink", "with the sink"):
        sink = None
        database = f"bench_{int(time.time())}"
        if mode == "with the sink":
            config = Config(clickhouse_url=url, clickhouse_database=database)
            sink = ClickHouse.of(config, reactor, Counter(), "bench")
            inserts = timed(sink, reactor)
            sink.startService()
        registry = registry_with(sink)
        seq = [0]
        largest = [0]
        started_cpu, started = cpu(), reactor.seconds()

        def feed():
            # What is due by now: a late slice catches up, as a fuller socket read would.
            now = reactor.seconds()
            due = int((now - started) * rate)
            for n in range(seq[0], due):
                registry.receive_datagram(f"127.1.0.{n % INSTANCES + 1}", gram(n // INSTANCES), now)
            seq[0] = max(seq[0], due)
            if sink is not None:
                largest[0] = max(largest[0], sink.queued_rows)

        loop = task.LoopingCall(feed)
        # Every millisecond, about 50 lines: what a read of the socket finds at 50,000/s.
        done = loop.start(0.001)
        yield task.deferLater(reactor, seconds, loop.stop)
        yield done
        fed_seconds = reactor.seconds() - started
        fed = seq[0]
        if sink is not None:
            # What waits goes before the sink stops (at most 5 s).
            yield sink.stopService()
        used = cpu() - started_cpu
        result = {"lines": fed, "seconds": round(fed_seconds, 2), "cpu_seconds": round(used, 2),
                  "rate": round(fed / fed_seconds)}
        if sink is not None:
            counted = yield query(f"SELECT count() FROM {database}.kernel_log")
            yield query(f"DROP DATABASE {database}")
            result.update(
                sent=sink.stats["clickhouse_rows_sent"], dropped=sink.stats["clickhouse_rows_dropped"],
                errors=sink.stats["clickhouse_insert_errors"], largest_queue=largest[0],
                clickhouse_count=int(counted.strip()), inserts=len(inserts),
                rows_an_insert=round(sum(r for r, _ in inserts) / max(1, len(inserts))),
                seconds_an_insert=round(sum(t for _, t in inserts) / max(1, len(inserts)), 3),
            )
        results[mode] = result
    base, full = results["without the sink"], results["with the sink"]
    per_line = (full["cpu_seconds"] - base["cpu_seconds"]) / full["lines"] * 1e6
    print(f"keeping up at {rate} lines a second for {seconds:g} s, {INSTANCES} instances:")
    for mode, result in results.items():
        print(f"  {mode:17} {json.dumps(result)}")
    print(f"  the sink's CPU, sending included: {per_line:.2f} us a line "
          f"({per_line * rate / 1e6 * 100:.0f} % of a core at {rate}/s)")


@defer.inlineCallbacks
def query(url: str, sql: str):
    """The text of a query's answer."""
    response = yield treq.post(url + "/", data=sql.encode("utf-8"), timeout=30)
    body = yield treq.content(response)
    if response.code != 200:
        raise RuntimeError(body.decode("utf-8", "replace"))
    return body.decode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--lines", type=int, default=200_000, help="lines of the in-process part")
    parser.add_argument("--url", help="a running ClickHouse (default: start one)")
    parser.add_argument("--instructions", action="store_true",
                        help="count the in-process part's instructions with valgrind, and stop")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.work:
        work(*json.loads(args.work))
        return
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("needs valgrind (Debian: apt-get install valgrind)")
        instructions(args.lines // 10, args.lines // 10 * 3)
        return
    in_process(args.lines)

    from twisted.internet import reactor
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    def show(event):
        # The sink's failures and notices, as the server would log them.
        if event.get("log_level", LogLevel.debug) >= LogLevel.info and "ClickHouse" in (formatEvent(event) or ""):
            print("  log:", formatEvent(event))

    globalLogPublisher.addObserver(show)

    from tests import clickhouse_server

    @defer.inlineCallbacks
    def run():
        server = None
        url = args.url
        try:
            if url is None:
                reason = clickhouse_server.unavailable()
                if reason:
                    raise SystemExit(f"cannot start ClickHouse: {reason}")
                server = clickhouse_server.ClickHouseServer()
                yield server.start()
                url = server.url
            yield keep_up(reactor, url, args.rate, args.seconds, partial(query, url))
        finally:
            if server is not None:
                yield server.stop()
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main()
