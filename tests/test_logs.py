"""What reaches the log from outside: escaped, rate-limited across sources, never the API key."""

from __future__ import annotations

import ipaddress
import os
import re
from collections import Counter

from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.client import ResponseFailed

from tempesta_ts import log
from tempesta_ts.access import SourceFilter
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.config import Config
from tempesta_ts.intake import Intake
from tempesta_ts.reporter import Reporter
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.sysinfo import SystemInfoFactory
from tempesta_ts.udp import NetconsoleProtocol
from tests.https_server import TrackingSite, listen, make_certificates
from tests.test_reporter import CLIENT, Answer, FakeSupport, MaxRandom, report
from tests.waits import wait_until

#: What must never reach a terminal raw: C0/C1 controls, DEL, bidi embeddings, overrides,
#: isolates and marks, line and paragraph separators.
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
HOST = "192.0.2.10"
FORGED = "\x1b[2K\rFORGED 2026 [\u202e] Report x delivered\x00\x07 \u2066\\x1b\u2069"
KEY = "k3y-0f-the-supp0rt-server-XYZ123"


def captured(case: unittest.TestCase) -> list[dict]:
    """Every log event published while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def key_pieces(text: str, size: int = 8) -> list[str]:
    """The pieces of KEY of `size` characters found in `text`."""
    return [KEY[i : i + size] for i in range(len(KEY) - size + 1) if KEY[i : i + size] in text]


class EscapeTests(unittest.TestCase):
    """Kernel lines and peers' words are logged with their controls made visible."""

    def setUp(self):
        self.events = captured(self)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def assert_nothing_raw(self):
        for event in self.events:
            self.assertIsNone(RAW.search(formatEvent(event)), formatEvent(event))

    def test_controls_bidi_and_backslashes_become_unambiguous_escapes(self):
        self.assertEqual(log.escape("plain é text"), "plain é text")
        self.assertEqual(log.escape("\x1b[31m\rA\nB\tC\x00\x7f\x85"),
                         "\\x1b[31m\\rA\\nB\\tC\\x00\\x7f\\x85")
        self.assertEqual(log.escape("\u202aa\u202eb\u2066c\u2069\u200f\u2028"),
                         "\\u202aa\\u202eb\\u2066c\\u2069\\u200f\\u2028")
        self.assertEqual(log.escape("\U000e0041\ud800"), "\\U000e0041\\ud800")
        # A real ESC and the four characters "\x1b" (how a non-UTF-8 byte is kept) differ.
        self.assertEqual(log.escape("\\x1b"), "\\\\x1b")
        self.assertNotEqual(log.escape("\\x1b"), log.escape("\x1b"))

    def test_a_forged_kernel_line_is_logged_escaped_as_incident_and_debug_line(self):
        self.addCleanup(log.set_level, log.level().name)
        log.set_level("debug")
        config = Config(log_level="debug", metrics_port=0, spool_dir=self.mktemp())
        svc = TroubleshootingService(config, task.Clock())
        line = "WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 f+0x1/0x2 " + FORGED
        svc.registry.receive_datagram(HOST, f"[   10.000000] {line}\n".encode(), 1.0)
        incident = [t for t in self.texts() if t.startswith(f"warning on {HOST}: WARNING")]
        debug = [t for t in self.texts() if t.startswith(f"{HOST} WARNING")]
        self.assertEqual((len(incident), len(debug)), (1, 1))
        shown = ("\\x1b[2K\\rFORGED 2026 [\\u202e] Report x delivered\\x00\\x07 "
                 "\\u2066\\\\x1b\\u2069")
        self.assertIn(shown, incident[0])
        self.assertIn(shown, debug[0])
        self.assert_nothing_raw()

    def test_a_rejecting_answer_is_logged_escaped(self):
        rep = Reporter(
            Config(support_host="support.test", support_client_id=CLIENT, support_api_key=KEY,
                   spool_dir=self.mktemp()),
            task.Clock(), Counter(),
            http_client=StubTreq(FakeSupport([Answer(400, body=FORGED.encode())])),
            rng=MaxRandom(),
        )
        rep.startService()
        self.addCleanup(rep.stopService)
        rep.submit(report(1))
        (rejected,) = [t for t in self.texts() if "rejected report" in t]
        self.assertIn("\\rFORGED 2026 [\\u202e]", rejected)
        self.assert_nothing_raw()

    def test_a_failure_described_by_the_peer_is_logged_and_kept_escaped(self):
        rep = failing_reporter(self, ValueError(FORGED))
        (failed,) = [t for t in self.texts() if "not delivered" in t]
        self.assertIn("\\rFORGED 2026", failed)
        self.assertIsNone(RAW.search(rep.last_error))
        self.assertIsNone(RAW.search(rep.states[report(1)["report_id"]].last_error))
        self.assert_nothing_raw()


class FailingClient:
    """An HTTP client whose every request fails with `error` (what a peer's answer raised)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def post(self, *args, **kwargs):
        return defer.fail(ResponseFailed([Failure(self.error)]))


def failing_reporter(case: unittest.TestCase, error: Exception) -> Reporter:
    """A started Reporter whose one report failed with `error`."""
    rep = Reporter(
        Config(support_host="support.test", support_client_id=CLIENT, support_api_key=KEY,
               spool_dir=case.mktemp()),
        task.Clock(), Counter(), http_client=FailingClient(error), rng=MaxRandom(),
    )
    rep.startService()
    case.addCleanup(rep.stopService)
    rep.submit(report(1))
    return rep


class RefusalFloodTests(unittest.TestCase):
    """Refused sources are named a few at a time, however many there are."""

    def setUp(self):
        self.events = captured(self)
        self.clock = task.Clock()
        self.stats = Counter()
        registry = BufferRegistry(100, 10_000, 10_000_000, self.stats)
        sources = SourceFilter([ipaddress.ip_network("10.0.0.0/8")])
        self.intake = Intake(registry, self.clock, sources, self.stats)

    def notices(self) -> list[str]:
        return [t for t in map(formatEvent, self.events) if t.startswith("Rejected ")]

    def test_3000_refused_sources_in_a_second_write_a_handful_of_lines(self):
        udp = NetconsoleProtocol(self.intake)
        tcp = SystemInfoFactory(self.intake, 1000, 10.0, 10)
        first = ipaddress.ip_address("198.18.0.1")
        for n in range(3000):
            self.clock.advance(1 / 6000)
            udp.datagramReceived(b"x\n", (str(first + n), 6665))
            self.assertIsNone(tcp.buildProtocol(IPv4Address("TCP", str(first + n), 40000)))
        self.assertEqual(self.stats["sources_rejected"], 6000)
        self.assertLessEqual(len(self.notices()), 5)
        self.clock.advance(60)
        udp.datagramReceived(b"x\n", ("203.0.113.9", 6665))
        self.assertEqual(self.stats["sources_rejected"], 6001)
        last = self.notices()[-1]
        self.assertTrue(last.startswith("Rejected UDP from 203.0.113.9"), last)
        self.assertIn(f"({6000 - len(self.notices()) + 1} other refused sources not named)", last)

    def test_a_lone_refused_source_is_still_named_at_once_and_each_minute(self):
        udp = NetconsoleProtocol(self.intake)
        for _ in range(10):
            udp.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        self.clock.advance(61)
        udp.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        self.assertEqual(len(self.notices()), 2)
        self.assertIn("(9 more from it held back", self.notices()[1])
        # No zero-count suffix.
        self.assertNotIn("other refused sources", self.notices()[1])


class EchoedKey(resource.Resource):
    """A Support Server that refuses every report (400), echoing the key after `before` bytes."""

    isLeaf = True

    def __init__(self, before: bytes, after: bytes = b"") -> None:
        super().__init__()
        self.body = before + KEY.encode() + after

    def render_POST(self, request) -> bytes:
        request.setResponseCode(400)
        return self.body


class KeyInAnswersTests(unittest.TestCase):
    """No piece of the API key of 8 characters reaches the log or the report's state."""

    timeout = 15

    def setUp(self):
        self.events = captured(self)

    def test_a_piece_of_the_key_is_masked_wherever_it_appears(self):
        self.assertEqual(log.mask_secret(f"a {KEY[3:15]} b", KEY), "a ******** b")
        self.assertEqual(log.mask_secret(f"a {KEY[3:10]} b", KEY), f"a {KEY[3:10]} b")
        self.assertEqual(log.mask_secret(f"{KEY}{KEY[:20]}", KEY), "********")
        # Where a text is cut, even a short start of the key goes: its rest was cut off.
        self.assertEqual(log.mask_secret(f"a {KEY[:5]}", KEY, cut=True), "a ********")
        self.assertEqual(log.mask_secret("a short text", KEY, cut=True), "a short text")

    @defer.inlineCallbacks
    def test_a_key_echoed_after_180_bytes_leaves_no_piece_in_the_log(self):
        certs = make_certificates(self.mktemp())
        site = TrackingSite(EchoedKey(b"x" * 180, b'"}'))
        listening = listen(reactor, site, certs)
        spool_dir = self.mktemp()
        stats = Counter()
        config = Config(support_host="127.0.0.1", support_port=listening.getHost().port,
                        support_client_id=CLIENT, support_api_key=KEY, spool_dir=spool_dir,
                        support_ca_file=certs.ca_file)
        rep = Reporter(config, reactor, stats, connect_timeout=2, response_timeout=3)
        rep.startService()
        try:
            entry = yield rep.submit(report(1))
            yield wait_until(lambda: stats["reports_rejected"] == 1)
        finally:
            yield rep.stopService()
            yield listening.stopListening()
            yield wait_until(lambda: not site.open_channels)
        texts = [formatEvent(e) for e in self.events]
        (rejected,) = [t for t in texts if "rejected report" in t]
        self.assertIn("x" * 180 + "********", rejected)
        for event, text in zip(self.events, texts):
            self.assertEqual(key_pieces(text), [], text)
            self.assertEqual(key_pieces(repr(event)), [], text)
        self.assertEqual(rep.state_of(entry.report_id), "rejected")
        self.assertEqual(key_pieces(repr(rep.states)), [])
        self.assertEqual(key_pieces(rep.last_error), [])
        (kept,) = os.listdir(os.path.join(spool_dir, "rejected"))
        with open(os.path.join(spool_dir, "rejected", kept), encoding="utf-8") as f:
            self.assertEqual(key_pieces(f.read()), [])

    def test_a_key_cut_in_a_failure_text_leaves_no_piece(self):
        rep = failing_reporter(self, ValueError("y" * 190 + KEY))
        texts = [formatEvent(e) for e in self.events]
        self.assertTrue([t for t in texts if "not delivered" in t])
        for text in texts + [rep.last_error]:
            self.assertEqual(key_pieces(text), [], text)
