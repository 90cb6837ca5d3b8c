"""A Support Server that misbehaves: every wait is bounded, every report gets through once it
recovers, and no in-flight slot leaks. Real TLS over loopback, real time (short deadlines)."""

from __future__ import annotations

import json
from collections import Counter

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts.config import Config
from tempesta_ts.reporter import SHUTDOWN_GRACE, Reporter
from tests.https_server import make_certificates, stop_loopback
from tests.support_standin import StandIn
from tests.test_reporter import CLIENT, KEY, report
from tests.waits import wait_until

#: The whole-attempt deadline of these tests (30 s in service).
DEADLINE = 0.5


class MisbehavingServerTests(unittest.TestCase):
    """The real reporter against the stand-in, switched from misbehaving to recovered."""

    timeout = 30

    def setUp(self):
        self.certs = make_certificates(self.mktemp())
        self.stats = Counter()
        self.reporters: list[Reporter] = []
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.standin = StandIn(reactor, self.certs)
        self.port = self.standin.listen()
        self.addCleanup(self.stop_all)
        self.most_in_flight = 0

    @defer.inlineCallbacks
    def stop_all(self):
        yield stop_loopback(self.reporters, [])
        yield self.standin.stop()

    def start(self, **kw) -> Reporter:
        config = Config(support_host="127.0.0.1", support_port=self.port,
                        support_client_id=CLIENT, support_api_key=KEY,
                        support_ca_file=self.certs.ca_file, spool_dir=self.mktemp())
        rep = Reporter(config, reactor, self.stats, backoff_base=0.05, backoff_cap=0.2,
                       connect_timeout=2, response_timeout=DEADLINE, **kw)
        rep.startService()
        self.reporters.append(rep)
        return rep

    def watch(self, rep: Reporter, predicate):
        """wait_until(predicate), noting the most requests in flight seen meanwhile."""
        def check():
            self.most_in_flight = max(self.most_in_flight, rep.in_flight)
            return predicate()
        return wait_until(check)

    @defer.inlineCallbacks
    def misbehave_then_recover(self, mode: str, failures: int = 2, reports: int = 1, **kw):
        """Submit under `mode` until `failures` attempts failed, then answer: all delivered."""
        self.standin.mode = mode
        rep = self.start(**kw)
        for n in range(reports):
            yield rep.submit(report(n + 1))
        yield self.watch(rep, lambda: self.stats["reports_retried"] >= failures)
        self.assertEqual(self.stats["reports_delivered"], 0)
        self.standin.mode = "answer"
        yield self.watch(rep, lambda: self.stats["reports_delivered"] == reports)
        yield self.watch(rep, lambda: rep.in_flight == 0)
        self.assertEqual(rep.spool.count, 0)
        self.assertIsNone(rep.last_error)
        delivered = {json.loads(body)["report_id"] for _, body in self.standin.requests}
        self.assertLessEqual({report(n + 1)["report_id"] for n in range(reports)}, delivered)
        return rep

    def failures_logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "not delivered" in formatEvent(e)]

    @defer.inlineCallbacks
    def test_a_server_that_accepts_and_never_answers_is_timed_out_then_delivered_to(self):
        started = reactor.seconds()
        rep = yield self.misbehave_then_recover("hang")
        self.assertIn(f"no answer from 127.0.0.1:{self.port} within {DEADLINE:g} s",
                      self.failures_logged()[0])
        self.assertGreater(reactor.seconds() - started, 2 * DEADLINE)
        self.assertEqual(rep.in_flight, 0)

    @defer.inlineCallbacks
    def test_a_trickling_answer_is_cut_by_the_whole_attempt_deadline(self):
        # A byte every 50 ms: never idle long, yet the answer would take seconds whole.
        self.standin.interval = 0.05
        self.standin.mode = "trickle"
        rep = self.start()
        started = reactor.seconds()
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_retried"] >= 1)
        self.assertLess(reactor.seconds() - started, DEADLINE + 1.0)
        self.assertEqual(rep.last_error_kind, "timeout")
        self.standin.mode = "answer"
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        yield wait_until(lambda: rep.in_flight == 0)

    @defer.inlineCallbacks
    def test_a_hang_up_in_the_middle_of_the_status_line_is_retried_then_delivered(self):
        yield self.misbehave_then_recover("hangup")
        self.assertIn("lost before an answer", self.failures_logged()[0])

    @defer.inlineCallbacks
    def test_a_stalled_tls_handshake_is_timed_out_then_delivered_to(self):
        rep = yield self.misbehave_then_recover("stall_tls")
        self.assertIn("timeout", self.failures_logged()[0])
        # Not one request came through a stalled handshake: only the ones after the recovery.
        self.assertEqual(len(self.standin.requests), 1)
        self.assertEqual(rep.in_flight, 0)

    @defer.inlineCallbacks
    def test_a_server_answering_5xx_gets_every_report_once_it_recovers(self):
        yield self.misbehave_then_recover("status", reports=3, failures=4)

    @defer.inlineCallbacks
    def test_more_reports_than_slots_against_a_hanging_server_all_get_through(self):
        rep = yield self.misbehave_then_recover("hang", reports=10, failures=12, max_in_flight=3)
        self.assertEqual(self.most_in_flight, 3)
        self.assertEqual(rep.in_flight, 0)
        self.assertEqual(self.stats["reports_delivered"], 10)

    @defer.inlineCallbacks
    def test_a_2xx_whose_body_is_not_json_is_delivered(self):
        self.standin.mode = "not_json"
        rep = self.start()
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(self.stats["reports_retried"], 0)
        self.assertEqual(len(self.standin.requests), 1)
        self.assertEqual(rep.spool.count, 0)

    @defer.inlineCallbacks
    def test_a_2xx_cut_in_its_body_is_delivered_not_sent_again(self):
        self.standin.mode = "hangup_body"
        rep = self.start()
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(self.stats["reports_retried"], 0)
        self.assertEqual(len(self.standin.requests), 1)
        yield wait_until(lambda: rep.in_flight == 0)

    @defer.inlineCallbacks
    def test_a_2xx_whose_body_trickles_is_delivered_by_the_deadline(self):
        self.standin.interval = 0.05
        self.standin.mode = "trickle_body"
        rep = self.start()
        started = reactor.seconds()
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertLess(reactor.seconds() - started, DEADLINE + 1.0)
        self.assertEqual(self.stats["reports_retried"], 0)
        self.assertEqual(len(self.standin.requests), 1)
        yield wait_until(lambda: rep.in_flight == 0)


class StubbornClient:
    """An HTTP client whose requests ignore their cancellation (their Deferred is paused)."""

    def __init__(self) -> None:
        self.requests: list[defer.Deferred] = []

    def post(self, url, data=None, headers=None, **kw) -> defer.Deferred:
        d = defer.Deferred()
        d.pause()
        self.requests.append(d)
        return d


class SlotTests(unittest.TestCase):
    """In-flight slots on a Clock: freed at the deadline whatever the request does."""

    def test_a_request_that_ignores_its_cancellation_frees_its_slot_at_the_deadline(self):
        clock = task.Clock()
        stats = Counter()
        client = StubbornClient()
        config = Config(support_host="support.test", support_client_id=CLIENT,
                        support_api_key=KEY, spool_dir=self.mktemp())
        rep = Reporter(config, clock, stats, http_client=client, max_in_flight=1,
                       response_timeout=30)
        rep.startService()
        rep.submit(report(1))
        rep.submit(report(2))
        self.assertEqual((len(client.requests), rep.in_flight), (1, 1))
        clock.advance(30)
        # The first attempt is over (a timeout, retried); its slot went to the second report.
        self.assertEqual(stats["reports_retried"], 1)
        self.assertEqual(rep.last_error_kind, "timeout")
        self.assertEqual((len(client.requests), rep.in_flight), (2, 1))
        # Its result, when it comes at last, is ignored: the second keeps the slot.
        client.requests[0].unpause()
        self.assertEqual(rep.in_flight, 1)
        self.assertEqual(stats["reports_retried"], 1)
        # The stop, too, ends within its grace although the request ignores its cancellation.
        stopped = rep.stopService()
        clock.advance(SHUTDOWN_GRACE)
        self.successResultOf(stopped)
        self.assertEqual(rep.in_flight, 0)
        self.assertEqual(rep.spool.count, 2)  # both kept for the next run
