"""The probe and a /status.json guarded by status_token: it gives the token from
$TEMPESTA_TS_STATUS_TOKEN, and says what to do on a 403."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from tempesta_ts import probe
from tests.test_probe import options


class Forbidding(resource.Resource):
    """A /status.json that answers 403, as the server does to a non-loopback client without
    the token; remembers the Authorization headers it was given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list = []

    def render_GET(self, request):
        self.authorizations.append(request.getHeader(b"authorization"))
        request.setResponseCode(403)
        return b"403 Forbidden\n"


class ProbeTokenTests(unittest.TestCase):
    """Against a real HTTP server on loopback."""

    def setUp(self):
        self.page = Forbidding()
        self.port = reactor.listenTCP(0, server.Site(self.page), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/status.json"

    @defer.inlineCallbacks
    def run_probe(self, token):
        lines: list[str] = []
        argv = ["--host", "127.0.0.1", "--port", "9", "--status-url", self.url, "--timeout", "2"]
        code = yield probe.Probe(reactor, options(*argv), lines.append, poll_interval=0.05,
                                 status_token=token).run()
        return code, "\n".join(lines)

    @defer.inlineCallbacks
    def test_a_403_says_to_give_the_status_token(self):
        code, output = yield self.run_probe(None)
        self.assertEqual(code, 1)
        self.assertIn("answered HTTP 403", output)
        self.assertIn("$TEMPESTA_TS_STATUS_TOKEN", output)
        self.assertEqual(self.page.authorizations[0], None)

    @defer.inlineCallbacks
    def test_the_token_is_given_as_bearer(self):
        yield self.run_probe("tok-123")
        self.assertEqual(self.page.authorizations[0], b"Bearer tok-123")
