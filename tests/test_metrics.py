"""/metrics: names, types and values after real traffic through the server's own protocols."""

from __future__ import annotations

import ipaddress
import os
import re
import socket

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

import tempesta_ts
from tempesta_ts import __version__, archive
from tempesta_ts.config import Config
from tempesta_ts.metrics import (
    DELIVERY_BUCKETS,
    KNOWN_STATS,
    Histogram,
    read_udp_receive_buffer_errors,
    read_udp_socket,
)
from tempesta_ts.service import TroubleshootingService
from tests.captures import datagrams, expected_lines
from tests.test_reporter import CLIENT, EPOCH, KEY, Answer, FakeSupport, MaxRandom
from tests.waits import wait_until
from tests.live import start_live

PLAIN = "plain-boot-and-warning.txt"
FRAGMENTED = "extended-fragmented.txt"


class Fetch(protocol.Protocol):
    """One HTTP/1.0 request; the server closes the connection after its answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data: list[bytes] = []
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason=None) -> None:
        self.done.callback(b"".join(self.data))


@defer.inlineCallbacks
def http_get(address: tuple[str, int], path: str, accept: str | None = None):
    """GET over real loopback: (status, headers lower-cased, body)."""
    extra = f"Accept: {accept}\r\n" if accept else ""
    fetch = Fetch(f"GET {path} HTTP/1.0\r\nHost: test\r\n{extra}\r\n".encode("ascii"))
    yield connectProtocol(TCP4ClientEndpoint(reactor, *address), fetch)
    raw = yield fetch.done
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def types(text: str) -> dict[str, str]:
    """Family name -> type (the parser gives counters' names without _total)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def value(found: dict, name: str, **labels) -> float:
    """One sample's value; KeyError names what is missing."""
    key = (name, frozenset(labels.items()))
    if key not in found:
        raise KeyError(f"no sample {name}{labels or ''}")
    return found[key]


class ServerCase(unittest.TestCase):
    """A whole TroubleshootingService built on a Clock; datagrams go through its UDP protocol
    (the real hot path), pages through StubTreq against the real resources. Nothing binds."""

    stub = None

    def make(self, support: FakeSupport | None = None, **settings) -> TroubleshootingService:
        self.clock = task.Clock()
        self.clock.advance(EPOCH)
        values = dict(host="127.0.0.1", port=0, spool_dir=self.mktemp(), settle_seconds=1.0)
        if support is not None:
            values.update(
                support_host="support.test", support_client_id=CLIENT, support_api_key=KEY
            )
            self.support = support
            self.stub = StubTreq(support)
        values.update(settings)
        svc = TroubleshootingService(Config(**values), self.clock, http_client=self.stub)
        if support is not None:
            # Retries at the backoff's ceiling, so that delivery times are known.
            svc.reporter.rng = MaxRandom()
            svc.reporter.startService()
            self.addCleanup(svc.reporter.stopService)
        return svc

    def send(self, svc: TroubleshootingService, host: str, *grams: bytes) -> None:
        for gram in grams:
            svc.udp.datagramReceived(gram, (host, 6665))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.stub is not None:
            self.stub.flush()

    def get(self, svc: TroubleshootingService, path: str, headers=None):
        """(response, body) of a GET against the web endpoint's resources."""
        stub = StubTreq(svc.web.site.resource)
        d = stub.get("http://127.0.0.1:9478" + path, headers=headers)
        stub.flush()
        response = self.successResultOf(d)
        body = stub.content(response)
        stub.flush()
        return response, self.successResultOf(body)

    def scrape(self, svc: TroubleshootingService) -> str:
        response, body = self.get(svc, "/metrics")
        self.assertEqual(response.code, 200)
        return body.decode("utf-8")


class TrafficTests(ServerCase):
    """Counters and gauges read what the protocols counted."""

    def test_datagrams_lines_losses_fragments_and_rejections(self):
        svc = self.make(allowed_sources=(ipaddress.ip_network("127.0.0.0/29"),))
        sent = []

        def send(host, *grams):
            sent.extend(grams)
            self.send(svc, host, *grams)

        send("127.0.0.2", *datagrams(PLAIN))
        send("127.0.0.3", *datagrams(FRAGMENTED))
        # Sequence 10, then 14: 11 to 13 are lost; 14 again is a duplicate.
        send("127.0.0.4", b"6,10,100,-;first\n", b"6,14,200,-;second\n", b"6,14,200,-;second\n")
        # The first fragment of a message of 2000 bytes: it waits for the rest.
        send("127.0.0.5", b"6,1,300,-,ncfrag=0/2000;" + b"x" * 1000)
        # An impossible fragment header.
        send("127.0.0.5", b"6,2,400,-,ncfrag=0/0;x")
        # Not in allowed_sources.
        send("127.0.0.9", b"[    1.000000] from elsewhere\n")
        text = self.scrape(svc)
        found = samples(text)

        self.assertEqual(value(found, "tempesta_ts_datagrams_received_total"), len(sent))
        self.assertEqual(value(found, "tempesta_ts_received_bytes_total"), sum(map(len, sent)))
        held = list(svc.registry)
        buffered_lines = sum(len(i.buffer) for i in held)
        self.assertGreaterEqual(
            buffered_lines, len(expected_lines(PLAIN)) + len(expected_lines(FRAGMENTED)) + 2
        )
        self.assertEqual(value(found, "tempesta_ts_log_lines_total"), buffered_lines)
        self.assertEqual(value(found, "tempesta_ts_buffered_lines"), buffered_lines)
        self.assertEqual(
            value(found, "tempesta_ts_buffered_bytes"), sum(i.buffer.bytes for i in held)
        )
        self.assertEqual(value(found, "tempesta_ts_instances"), 4)
        self.assertEqual(value(found, "tempesta_ts_instances_created_total"), 4)
        self.assertEqual(value(found, "tempesta_ts_instances_evicted_total"), 0)
        self.assertEqual(value(found, "tempesta_ts_instances_max"), 1000)
        self.assertEqual(value(found, "tempesta_ts_lost_messages"), 3)
        self.assertEqual(value(found, "tempesta_ts_duplicate_messages_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_malformed_datagrams_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_fragmented_messages_pending"), 1)
        self.assertEqual(
            value(found, "tempesta_ts_fragments_received_total"), svc.stats["fragments_received"]
        )
        self.assertGreater(svc.stats["fragments_received"], 1)
        self.assertEqual(value(found, "tempesta_ts_sources_rejected_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_errors_total", part="udp"), 0)
        self.assertEqual(
            value(found, "tempesta_ts_incidents_total", kind="warning"),
            svc.stats["incidents_warning"],
        )
        self.assertGreaterEqual(svc.stats["incidents_warning"], 1)
        self.assertEqual(value(found, "tempesta_ts_incidents_total", kind="crash"), 0)
        self.assertEqual(
            value(found, "tempesta_ts_instance_last_seen_timestamp_seconds", address="127.0.0.4"),
            EPOCH,
        )
        self.assertEqual(value(found, "tempesta_ts_build_info", version=__version__), 1)

        # The fragments never complete: after 5 s the message is kept incomplete.
        self.advance(6)
        svc.registry.expire(self.clock.seconds())
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_fragmented_messages_pending"), 0)
        self.assertEqual(value(found, "tempesta_ts_fragments_expired_total"), 1)

    def test_types_and_naming(self):
        svc = self.make()
        self.send(svc, "127.0.0.2", b"[    1.000000] hello\n")
        kinds = types(self.scrape(svc))
        ours = {name: kind for name, kind in kinds.items() if name.startswith("tempesta_ts_")}
        self.assertEqual(kinds["tempesta_ts_report_delivery_seconds"], "histogram")
        self.assertEqual(kinds["tempesta_ts_lost_messages"], "gauge")
        self.assertEqual(kinds["tempesta_ts_build_info"], "gauge")
        for name, kind in ours.items():
            if kind == "counter":
                # The parser strips _total; the exposition has it (checked below).
                self.assertNotIn(f"{name}_total", kinds, name)
            else:
                self.assertFalse(name.endswith("_total"), name)
        text = self.scrape(svc)
        counters = [n for n, k in ours.items() if k == "counter"]
        self.assertGreater(len(counters), 20)
        for name in counters:
            self.assertIn(f"\n{name}_total", text)
        self.assertIn("process_resident_memory_bytes", kinds)

    def test_buffer_pushouts_and_evictions(self):
        svc = self.make(buffer_max_lines=2, max_instances=2)
        self.send(svc, "127.0.0.2", b"[    1.000000] a\n[    1.000001] b\n[    1.000002] c\n")
        self.send(svc, "127.0.0.3", b"[    1.000000] x\n")
        self.send(svc, "127.0.0.4", b"[    1.000000] y\n")
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_lines_pushed_out_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_instances_evicted_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_instances"), 2)

    def test_the_global_registry_is_left_alone(self):
        svc = self.make()
        self.scrape(svc)
        self.assertIsNone(
            REGISTRY.get_sample_value("tempesta_ts_build_info", {"version": __version__})
        )

    def test_openmetrics_when_asked(self):
        svc = self.make()
        accept = {"Accept": "application/openmetrics-text"}
        response, body = self.get(svc, "/metrics", headers=accept)
        content_type = response.headers.getRawHeaders("content-type")[0]
        self.assertIn("application/openmetrics-text", content_type)
        self.assertTrue(body.rstrip().endswith(b"# EOF"))


class ArchiveMetricsTests(ServerCase):
    """The archive's bytes on disk and its lines not in their files yet."""

    def test_lines_waiting_for_the_archive_and_its_bytes_are_shown(self):
        # As with more than 256 instances at once: the lines are held, in the journal.
        self.patch(archive, "DIRECT_INSTANCES", 0)
        svc = self.make()
        svc.archive.startService()
        self.addCleanup(svc.archive.stopService)
        self.send(svc, "127.0.0.2", b"6,1,1000,-;first\n", b"6,2,2000,-;second\n")
        self.advance(1.0)
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_archive_pending_lines"), 2)
        journal = os.path.join(svc.archive.directory, ".journal")
        self.assertEqual(value(found, "tempesta_ts_archive_bytes"), os.path.getsize(journal))
        self.advance(archive.HOLD_SECONDS)
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_archive_pending_lines"), 0)
        self.assertEqual(value(found, "tempesta_ts_archive_bytes"),
                         os.path.getsize(os.path.join(svc.archive.directory, "127.0.0.2.log")))

    def test_without_the_archive_its_gauges_are_absent(self):
        text = self.scrape(self.make(archive_dir=""))
        self.assertNotIn("tempesta_ts_archive_bytes", text)
        self.assertNotIn("tempesta_ts_archive_pending_lines", text)


class ReportMetricsTests(ServerCase):
    """Incidents, the spool and the delivery histogram, with a Support Server behind StubTreq."""

    def test_delivery_retry_spool_and_latency(self):
        support = FakeSupport([Answer(status=503)])
        svc = self.make(support)
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_reports_settling"), 1)
        self.assertEqual(value(found, "tempesta_ts_incidents_total", kind="warning"), 1)

        self.advance(1.0)  # settled: spooled, sent, answered 503
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_reports_settling"), 0)
        self.assertEqual(value(found, "tempesta_ts_reports_created_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_reports_spooled_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_reports_retried_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_reports_pending"), 1)
        self.assertEqual(value(found, "tempesta_ts_spool_bytes"), svc.reporter.spool.bytes)
        self.assertGreater(svc.reporter.spool.bytes, 0)
        self.assertEqual(value(found, "tempesta_ts_reports_delivered_total"), 0)
        self.assertEqual(value(found, "tempesta_ts_report_delivery_seconds_count"), 0)

        self.advance(0.75)
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_oldest_pending_report_age_seconds"), 0.75)

        self.advance(0.25)  # the retry, 1 s after the first attempt: delivered
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_reports_delivered_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_reports_pending"), 0)
        self.assertEqual(value(found, "tempesta_ts_spool_bytes"), 0)
        self.assertEqual(value(found, "tempesta_ts_oldest_pending_report_age_seconds"), 0)
        self.assertEqual(value(found, "tempesta_ts_report_delivery_seconds_count"), 1)
        self.assertEqual(value(found, "tempesta_ts_report_delivery_seconds_sum"), 1.0)
        bucket = "tempesta_ts_report_delivery_seconds_bucket"
        self.assertEqual(value(found, bucket, le="0.5"), 0)
        self.assertEqual(value(found, bucket, le="1.0"), 1)
        self.assertEqual(value(found, bucket, le="+Inf"), 1)

    def test_rejected_report(self):
        svc = self.make(FakeSupport([Answer(status=422)]))
        self.send(svc, "127.0.0.2", b"[   12.345678] BUG: unable to handle page fault\n")
        self.advance(1.0)
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_reports_rejected_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_reports_pending"), 0)

    def test_stand_alone_counts_reports_written(self):
        svc = self.make()
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        self.advance(1.0)
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_reports_written_local_total"), 1)
        self.assertEqual(value(found, "tempesta_ts_reports_spooled_total"), 0)


class HistogramTests(unittest.TestCase):
    """The delivery histogram's buckets."""

    def test_bounds_are_inclusive_and_cumulative(self):
        h = Histogram(DELIVERY_BUCKETS)
        for seconds in (0.05, 0.1, 0.2, 3600.0, 7200.0):
            h.observe(seconds)
        family = h.family("t_seconds", "test")
        got = {s.labels.get("le"): s.value for s in family.samples if s.name == "t_seconds_bucket"}
        self.assertEqual(got["0.1"], 2)
        self.assertEqual(got["0.25"], 3)
        self.assertEqual(got["1800.0"], 3)
        self.assertEqual(got["3600.0"], 4)
        self.assertEqual(got["+Inf"], 5)
        self.assertEqual(h.count, 5)
        self.assertAlmostEqual(h.sum, 10800.35)


class ProcTests(unittest.TestCase):
    """The kernel's own drop counters, from /proc."""

    def fake_proc(self, inode: int, drops: int = 7, queued: int = 0x300) -> str:
        proc = self.mktemp()
        os.makedirs(os.path.join(proc, "net"))
        with open(os.path.join(proc, "net", "snmp"), "w") as f:
            f.write(
                "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
                "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
                "Udp: 100 2 40 50 38 0\n"
                "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
                "UdpLite: 0 0 0 0 999 0\n"
            )
        with open(os.path.join(proc, "net", "snmp6"), "w") as f:
            f.write("Udp6InDatagrams                 \t5\nUdp6RcvbufErrors                \t4\n")
        header = (
            "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
            "timeout inode ref pointer drops\n"
        )
        with open(os.path.join(proc, "net", "udp"), "w") as f:
            f.write(header)
            f.write(
                "  1: 0100007F:15B3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0"
                "        0 1234 2 0000000000000000 0\n"
            )
            f.write(
                f"  2: 0100007F:15B4 00000000:0000 07 00000000:{queued:08X} 00:00000000 00000000"
                f"     0        0 {inode} 2 0000000000000000 {drops}\n"
            )
        with open(os.path.join(proc, "net", "udp6"), "w") as f:
            f.write(header)
        return proc

    def test_parsers(self):
        proc = self.fake_proc(inode=98765)
        self.assertEqual(read_udp_receive_buffer_errors(proc), 42)
        self.assertEqual(read_udp_socket(proc, 98765), (0x300, 7))
        self.assertIsNone(read_udp_socket(proc, 5))
        missing = self.mktemp()
        self.assertIsNone(read_udp_receive_buffer_errors(missing))
        self.assertIsNone(read_udp_socket(missing, 98765))

    def test_collector_finds_the_listening_socket_by_inode(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)

        class Port:
            def getHandle(self):
                return sock

            def getHost(self):
                return IPv4Address("UDP", "127.0.0.1", 5555)

        clock = task.Clock()
        config = Config(host="127.0.0.1", port=0, spool_dir=self.mktemp())
        svc = TroubleshootingService(config, clock)
        svc.listeners.udp_port = svc.listeners.tcp_port = Port()
        svc.web.collector.proc = self.fake_proc(inode=os.fstat(sock.fileno()).st_ino)
        found = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in svc.web.collector.collect()
            for s in family.samples
        }
        self.assertEqual(value(found, "tempesta_ts_udp_socket_drops_total"), 7)
        self.assertEqual(value(found, "tempesta_ts_udp_receive_queue_bytes"), 0x300)
        self.assertEqual(value(found, "tempesta_ts_udp_receive_buffer_errors_total"), 42)
        self.assertEqual(value(found, "tempesta_ts_listening"), 1)


class LoopbackTests(unittest.TestCase):
    """The real server on loopback: datagrams over UDP, /metrics over TCP."""

    @defer.inlineCallbacks
    def test_scrape_after_real_datagrams(self):
        config = Config(host="127.0.0.1", port=0, spool_dir=self.mktemp())
        svc = start_live(self, config)
        sender = protocol.DatagramProtocol()
        port = reactor.listenUDP(0, sender, interface="127.0.0.2")
        self.addCleanup(port.stopListening)
        grams = datagrams(PLAIN)
        for gram in grams:
            sender.transport.write(gram, svc.listeners.address)
        yield wait_until(lambda: svc.stats["datagrams"] == len(grams))

        status, headers, body = yield http_get(svc.web.address, "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        found = samples(body.decode("utf-8"))
        self.assertEqual(value(found, "tempesta_ts_datagrams_received_total"), len(grams))
        self.assertEqual(value(found, "tempesta_ts_instances"), 1)
        self.assertEqual(value(found, "tempesta_ts_listening"), 1)
        self.assertEqual(
            value(found, "tempesta_ts_udp_receive_buffer_bytes"), svc.udp.receive_buffer_granted
        )
        self.assertGreater(value(found, "process_resident_memory_bytes"), 0)
        if os.path.exists("/proc/net/udp"):
            self.assertEqual(value(found, "tempesta_ts_udp_socket_drops_total"), 0)
            self.assertIn(("tempesta_ts_udp_receive_queue_bytes", frozenset()), found)
        if os.path.exists("/proc/net/snmp"):
            self.assertIn(("tempesta_ts_udp_receive_buffer_errors_total", frozenset()), found)


class CounterTableTests(unittest.TestCase):
    """A counter the code keeps is a counter operators can see."""

    def test_every_stats_key_in_the_code_is_exported(self):
        package = os.path.dirname(os.path.abspath(tempesta_ts.__file__))
        keys = set()
        for name in os.listdir(package):
            if name.endswith(".py"):
                with open(os.path.join(package, name), encoding="utf-8") as f:
                    source = f.read()
                keys.update(re.findall(r'stats\[\s*"([a-z_]+)"\s*\]', source))
                # Intake.failed(what) counts into f"{what}_errors".
                keys.update(f"{what}_errors" for what in re.findall(r'\.failed\(\s*"([a-z_]+)"', source))
        self.assertTrue(keys)
        self.assertEqual(sorted(keys - set(KNOWN_STATS)), [])
