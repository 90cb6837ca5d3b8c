"""The operators' pages: /instances/{address}, /reports, /reports/{id}.json (the reports in
memory and those kept in spool_dir/sent/); who may read them (loopback, or the status_token);
real HTTP over loopback and a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from tempesta_ts.config import Config
from tempesta_ts.detail import PAGE_LINES, SENT_ROWS
from tempesta_ts.page_access import given_token, is_loopback, may_read
from tempesta_ts.pages import PRETTY_MAX_CHARS, system_info_text
from tempesta_ts.report import iso
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.spool_files import file_name
from tempesta_ts.webparts import size
from tests.captures import datagrams
from tests.test_reporter import EPOCH, Answer, FakeSupport
from tests.test_web import StatusCase
from tests.live import start_live

HOST = "127.0.0.2"
TOKEN = "s3cret-token-for-tests"
WARNING = b"[   12.345678] WARNING: CPU: 0 PID: 1 at net/core/dev.c:1 dev_xmit+0x1/0x2\n"
HOSTILE = "[    1.000000] <script>alert(1)</script> & \u202egnp.exe \x1b[31mred\n".encode()
SYSINFO = b'{"sys_info": {"current_kernel": "6.1.0-56-amd64", "cpus": [1, 2]}}'
PNG = b"\x89PNG\r\n\x1a\n"
#: Set to a directory (docs/images) to keep the browser's screenshots there.
SCREENSHOTS_ENV = "TEMPESTA_TS_SCREENSHOTS_DIR"


class AccessRuleTests(unittest.TestCase):
    """The rule, a pure function of the peer's address and the request's words."""

    def test_loopback_addresses_may_read_without_a_token(self):
        for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(may_read(host, None), host)
        for host in ("192.0.2.1", "10.0.0.1", "::", "2001:db8::1", "::ffff:192.0.2.1", "", None,
                     "not an address"):
            self.assertFalse(is_loopback(host), host)

    def test_others_need_the_configured_token(self):
        self.assertFalse(may_read("192.0.2.1", None))
        self.assertFalse(may_read("192.0.2.1", None, b"Bearer anything"))
        self.assertFalse(may_read("192.0.2.1", TOKEN))
        self.assertFalse(may_read("192.0.2.1", TOKEN, b"Bearer wrong"))
        self.assertFalse(may_read("192.0.2.1", TOKEN, b"Basic " + TOKEN.encode()))
        self.assertFalse(may_read("192.0.2.1", TOKEN, None, TOKEN.encode() + b"x"))
        self.assertTrue(may_read("192.0.2.1", TOKEN, b"Bearer " + TOKEN.encode()))
        self.assertTrue(may_read("2001:db8::1", TOKEN, b"bearer  " + TOKEN.encode() + b" "))
        self.assertTrue(may_read("192.0.2.1", TOKEN, None, TOKEN.encode()))

    def test_the_header_wins_over_the_query(self):
        self.assertEqual(given_token(b"Bearer a", b"b"), b"a")
        self.assertEqual(given_token(b"Bearer ", b"b"), b"b")
        self.assertIsNone(given_token(None, None))


class PagesCase(StatusCase):
    """Pages of a whole server on a Clock, asked through the real resources."""

    def fetch(self, svc, path: str, code: int = 200) -> str:
        response, body = self.get(svc, path)
        self.assertEqual(response.code, code, path)
        return body.decode("utf-8")

    def traffic(self, svc) -> None:
        self.send(svc, HOST, HOSTILE)
        self.system_info(svc, HOST, SYSINFO)
        self.send(svc, HOST, WARNING)
        self.advance(2.0)

    def plant(self, svc, report_id: str, created: float, delivered: float,
              body: bytes | None = None) -> str:
        """A report file in spool_dir/sent/, as a delivery leaves it; its path."""
        os.makedirs(svc.sent.directory, mode=0o700, exist_ok=True)
        path = os.path.join(svc.sent.directory, file_name(created, report_id))
        with open(path, "wb") as f:
            f.write(body if body is not None else json.dumps({"report_id": report_id}).encode())
        os.utime(path, (delivered, delivered))
        return path

    def sent_rows(self, page: str) -> list[tuple[str, str, str]]:
        """(delivered, report id, size) of each row of the page's Sent table."""
        table = page.split("<h2>Sent</h2>", 1)[1].split("</table>", 1)[0]
        return re.findall(r'<tr><td>([^<]*)</td><td><a href="/reports/[^"]*">([^<]*)</a></td>'
                          r'<td class="n">([^<]*)</td></tr>', table)


class FromElsewhereTests(PagesCase):
    """A request whose peer is not loopback (DummyRequest's faked transport peer)."""

    def render(self, svc, path: str, peer, headers=None, args=None) -> tuple[int, bytes]:
        segments = [s.encode() for s in path.strip("/").split("/")]
        request = DummyRequest(segments)
        request.client = peer
        request.args = args or {}
        for name, value in (headers or {}).items():
            request.requestHeaders.setRawHeaders(name, [value])
        resource = getChildForRequest(svc.web.site.resource, request)
        body = resource.render(request)
        return request.responseCode or 200, body

    def test_without_a_token_configured_pages_with_log_text_are_403_to_others(self):
        svc = self.make()
        self.traffic(svc)
        peer = IPv4Address("TCP", "192.0.2.1", 40000)
        for path in ("/status", "/status.json", f"/instances/{HOST}", "/reports"):
            code, body = self.render(svc, path, peer)
            self.assertEqual(code, 403, path)
            self.assertIn(b"no status_token is set", body)
            self.assertNotIn(b"WARNING", body)
        self.assertEqual(self.render(svc, "/metrics", peer)[0], 200)
        # Open: it answers as to anyone (503 here: the server on a Clock was never started).
        self.assertEqual(self.render(svc, "/healthz", peer), (503, b"stopping\n"))
        self.assertEqual(self.render(svc, f"/instances/{HOST}", IPv4Address("TCP", "127.0.0.3", 1))[0], 200)

    def test_with_the_token_as_bearer_or_query_others_may_read(self):
        svc = self.make(status_token=TOKEN)
        self.traffic(svc)
        peer = IPv6Address("TCP", "2001:db8::9", 40000)
        code, body = self.render(svc, f"/instances/{HOST}", peer,
                                 headers={b"authorization": b"Bearer " + TOKEN.encode()})
        self.assertEqual(code, 200)
        self.assertIn(b"WARNING", body)
        code, body = self.render(svc, "/status", peer, args={b"token": [TOKEN.encode()]})
        self.assertEqual(code, 200)
        # The links of a page asked for with ?token= carry it to the next page.
        self.assertIn(f'href="/instances/{HOST}?token={TOKEN}"'.encode(), body)
        code, body = self.render(svc, "/reports", peer, headers={b"authorization": b"Bearer no"})
        self.assertEqual(code, 403)
        self.assertIn(b"Authorization: Bearer TOKEN", body)

    def test_a_sent_report_follows_the_same_rule(self):
        svc = self.make(FakeSupport(), status_token=TOKEN)
        self.plant(svc, "a1", EPOCH - 60, EPOCH - 30, b'{"report_id": "a1", "secret": 1}')
        peer = IPv4Address("TCP", "192.0.2.1", 40000)
        for path in ("/reports", "/reports/a1.json"):
            code, body = self.render(svc, path, peer)
            self.assertEqual(code, 403, path)
            self.assertNotIn(b"a1", body)
        code, body = self.render(svc, "/reports/a1.json", peer,
                                 headers={b"authorization": b"Bearer " + TOKEN.encode()})
        self.assertEqual((code, json.loads(body)), (200, {"report_id": "a1", "secret": 1}))


class InstancePageTests(PagesCase):
    """/instances/{address}, asked from loopback."""

    def test_latest_lines_incident_marked_with_its_title_and_system_info_indented(self):
        svc = self.make()
        self.send(svc, HOST, *[f"6,{n},{n},-;line {n}\n".encode() for n in range(1, 1201)])
        self.system_info(svc, HOST, SYSINFO)
        self.send(svc, HOST, b"4,1201,1300000,-;WARNING: CPU: 0 PID: 1 at net/core/dev.c:1 "
                             b"dev_xmit+0x1/0x2\n")
        self.advance(2.0)
        page = self.fetch(svc, f"/instances/{HOST}")
        lines = re.findall(r"<code>([^<]*)</code>", page)
        self.assertEqual(len(lines), PAGE_LINES)
        self.assertEqual(lines[0], "line 202")
        self.assertIn("The latest 1,000 of 1,201 lines held", page)
        marked = re.findall(r'<tr class="i">.*?<td class="t">([^<]*)</td>', page)
        self.assertEqual(marked, ["WARNING in dev_xmit"])
        self.assertIn('"current_kernel": "6.1.0-56-amd64"', page.replace("&quot;", '"'))
        self.assertIn("JSON, indented", page)
        self.assertIn("written locally", page)
        self.assertRegex(page, r"\d+\.\d KiB")
        self.assertIn("s ago", page)

    def test_hostile_lines_are_escaped(self):
        svc = self.make()
        self.traffic(svc)
        page = self.fetch(svc, f"/instances/{HOST}")
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt; &amp; \\u202egnp.exe \\x1b[31mred", page)
        self.assertNotIn("\u202e", page)
        self.assertNotIn("\x1b", page)

    def test_unknown_instance_is_404(self):
        svc = self.make()
        self.assertIn("no instance is held", self.fetch(svc, "/instances/192.0.2.77", 404))
        self.fetch(svc, "/instances/", 404)

    def test_a_document_too_deep_or_too_large_is_shown_as_it_came(self):
        deep = "[" * 100000 + "]" * 100000
        self.assertEqual(system_info_text(deep, "json"), (deep, False))
        large = '{"a": "' + "x" * PRETTY_MAX_CHARS + '"}'
        self.assertEqual(system_info_text(large, "json"), (large, False))
        self.assertEqual(system_info_text('{"a": [1', "json"), ('{"a": [1', False))
        self.assertEqual(system_info_text('{"a":1}', "json"), ('{\n  "a": 1\n}', True))

    def test_sizes_in_human_units(self):
        self.assertEqual([size(n) for n in (512, 4096, 1536 * 1024, 3 * 1024 ** 3)],
                         ["512 B", "4.0 KiB", "1.5 MiB", "3.0 GiB"])


class ReportsPageTests(PagesCase):
    """/reports and /reports/{id}.json."""

    def test_stand_alone_reports_are_written_locally_and_their_json_is_what_was_kept(self):
        svc = self.make(report_redactions=((r"net/core", "NET/CORE"),))
        self.traffic(svc)
        page = self.fetch(svc, "/reports")
        [report_id] = re.findall(r'href="/reports/([0-9a-f]+)\.json"', page)
        self.assertIn("written locally", page)
        self.assertIn(f'href="/instances/{HOST}"', page)
        self.assertIn("/status", page)
        body = json.loads(self.fetch(svc, f"/reports/{report_id}.json"))
        self.assertEqual(body["report_id"], report_id)
        self.assertIn("NET/CORE", body["incidents"][0]["line"])
        [path] = os.listdir(os.path.join(svc.spool.directory, "local"))
        with open(os.path.join(svc.spool.directory, "local", path)) as f:
            self.assertEqual(json.load(f)["incidents"], body["incidents"])
        self.assertIn("no such report", self.fetch(svc, "/reports/0123.json", 404))
        self.assertIn("Recent reports", self.fetch(svc, "/status"))

    def test_settling_pending_with_attempts_and_error_then_delivered(self):
        svc = self.make(FakeSupport([Answer(status=503)]))
        self.send(svc, HOST, WARNING)
        self.assertIn("settling", self.fetch(svc, "/reports"))
        self.advance(1.0)
        page = self.fetch(svc, "/reports")
        row = re.search(r"<tr><td><a href=\"/instances/[^<]*</a></td>.*?</tr>", page).group()
        self.assertIn("<td>pending</td>", row)
        self.assertIn('<td class="n">1</td>', row)
        self.assertIn("HTTP 503 from the Support Server", row)
        self.advance(1.0)
        row = re.search(r"<tr><td><a href=\"/instances/[^<]*</a></td>.*?</tr>",
                        self.fetch(svc, "/reports")).group()
        self.assertIn("<td>delivered</td>", row)
        self.assertIn('<td class="n">2</td>', row)


class LoopbackTests(unittest.TestCase):
    """The real server on 127.0.0.1, asked by a real HTTP client and a real browser."""

    def start(self) -> TroubleshootingService:
        config = Config(host="127.0.0.1", port=0, spool_dir=self.mktemp(), settle_seconds=0.0)
        svc = start_live(self, config)
        # Real captures: a boot log and a crash, from two instances.
        for gram in datagrams("extended-boot-and-warning.txt")[-60:]:
            svc.udp.datagramReceived(gram, ("127.0.0.3", 6666))
        for gram in datagrams("plain-sysrq-crash.txt")[-40:]:
            svc.udp.datagramReceived(gram, ("127.0.0.4", 6666))
        for gram in (HOSTILE, WARNING, b"[   12.400000] Call Trace:\n"):
            svc.udp.datagramReceived(gram, (HOST, 6665))
        svc.tcp.accept(HOST, SYSINFO)
        return svc

    @defer.inlineCallbacks
    def settled(self, svc) -> defer.Deferred:
        # settle_seconds 0: the report is made on the reactor's next turn.
        for _ in range(50):
            if svc.stats["reports_created"] >= 3:
                return
            d = defer.Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d

    @defer.inlineCallbacks
    def test_every_page_over_loopback(self):
        svc = self.start()
        yield self.settled(svc)
        agent = Agent(reactor)
        pages = {}
        for path in ("/status", f"/instances/{HOST}", "/reports"):
            response = yield agent.request(b"GET", (svc.web.url + path).encode("ascii"))
            pages[path] = (yield readBody(response)).decode("utf-8")
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                             [b"text/html; charset=utf-8"])
        self.assertIn(f'href="/instances/{HOST}"', pages["/status"])
        self.assertIn("WARNING in dev_xmit", pages[f"/instances/{HOST}"])
        report_ids = re.findall(r'href="/reports/([0-9a-f]+)\.json"', pages["/reports"])
        self.assertEqual(len(report_ids), 3)
        report_id = svc.recent.of_instance(HOST)[0].report_id
        self.assertIn(report_id, report_ids)
        response = yield agent.request(
            b"GET", f"{svc.web.url}/reports/{report_id}.json".encode("ascii"),
            Headers({b"authorization": [b"Bearer unused-from-loopback"]}))
        self.assertEqual(json.loads((yield readBody(response)))["report_id"], report_id)

    @defer.inlineCallbacks
    def test_a_headless_browser_renders_each_page(self):
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise unittest.SkipTest("chromium is not installed (apt-get install -y chromium)")
        svc = self.start()
        yield self.settled(svc)
        home = self.mktemp()
        os.makedirs(home)
        report_id = svc.recent.of_instance(HOST)[0].report_id
        pages = {"instance": f"/instances/{HOST}", "reports": "/reports", "status": "/status",
                 "report-json": f"/reports/{report_id}.json"}
        keep = os.environ.get(SCREENSHOTS_ENV)
        for name, path in pages.items():
            shot = os.path.join(home, f"{name}.png")
            out, err, code = yield getProcessOutputAndValue(
                chromium,
                ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={home}/profile", f"--screenshot={shot}",
                 "--window-size=1200,900", svc.web.url + path],
                env={"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                reactor=reactor,
            )
            self.assertTrue(os.path.exists(shot), f"{path}: {code} {err[-500:]!r}")
            with open(shot, "rb") as f:
                self.assertEqual(f.read(8), PNG)
            if keep and name != "report-json":
                shutil.copy(shot, os.path.join(keep, f"page-{name}.png"))


class TokenSettingTests(unittest.TestCase):
    """status_token is read like the API key: the setting, a file, or the environment; never
    shown."""

    def test_from_a_file_then_the_environment_and_masked_where_shown(self):
        from tempesta_ts import config

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"  {TOKEN}\n")
        built = config.build({"status_token_file": path}, {}, {"TEMPESTA_TS_STATUS_TOKEN": "env"})
        self.assertEqual(built.status_token, TOKEN)
        self.assertEqual(config.build({}, {}, {"TEMPESTA_TS_STATUS_TOKEN": "env"}).status_token,
                         "env")
        self.assertNotIn(TOKEN, json.dumps(built.describe()))
        self.assertIsNone(config.build({}, {}, {}).status_token)

    def test_an_empty_or_unreadable_token_file_stops_the_start_in_one_line(self):
        from tempesta_ts import config

        path = self.mktemp()
        open(path, "w").close()
        for given in (path, path + ".missing"):
            with self.assertRaises(config.ConfigError) as caught:
                config.build({"status_token_file": given}, {}, {})
            self.assertIn("status_token_file", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class SentReportsPageTests(PagesCase):
    """/reports lists the reports kept in spool_dir/sent/; /reports/{id}.json shows them."""

    def test_a_delivered_report_is_listed_as_sent_and_shown_from_spool_dir_sent(self):
        svc = self.make(FakeSupport())
        svc.recent.max_body_bytes = 0  # memory holds no body: what is shown comes from sent/
        self.send(svc, HOST, WARNING)
        self.advance(2.0)
        self.assertEqual(svc.stats["reports_kept_sent"], 1)
        [kept] = svc.sent.listing()
        page = self.fetch(svc, "/reports")
        self.assertEqual(self.sent_rows(page),
                         [(f"{iso(EPOCH + 2.0)} (0 s ago)", kept.report_id, size(kept.size))])
        self.assertIn("1 kept in spool_dir/sent/", page)
        # The row of the report made links its JSON too, though memory no longer holds it.
        self.assertEqual(page.count(f'href="/reports/{kept.report_id}.json"'), 2)
        self.assertNotIn("no longer held", page)
        response, body = self.get(svc, f"/reports/{kept.report_id}.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        with open(kept.path, "rb") as f:
            self.assertEqual(body, f.read())
        self.assertEqual(json.loads(body)["report_id"], kept.report_id)
        self.assertEqual(self.support.requests[0]["body"], body)

    def test_sent_reports_are_listed_most_recently_delivered_first_with_id_and_size(self):
        svc = self.make(FakeSupport())
        # b was spooled first but delivered last (after retries).
        self.plant(svc, "a", EPOCH - 300, EPOCH - 200, b"{}")
        self.plant(svc, "b", EPOCH - 400, EPOCH - 100, b'{"report_id": "b"}')
        self.plant(svc, "c", EPOCH - 250, EPOCH - 150, b"x" * 3000)
        rows = self.sent_rows(self.fetch(svc, "/reports"))
        self.assertEqual(rows, [
            (f"{iso(EPOCH - 100)} (1 min ago)", "b", "18 B"),
            (f"{iso(EPOCH - 150)} (2 min ago)", "c", "2.9 KiB"),
            (f"{iso(EPOCH - 200)} (3 min ago)", "a", "2 B"),
        ])
        self.assertEqual(json.loads(self.fetch(svc, "/reports/b.json")), {"report_id": "b"})

    def test_the_sent_list_is_bounded_and_says_how_many_more_are_kept(self):
        svc = self.make(FakeSupport())
        for n in range(SENT_ROWS + 3):
            self.plant(svc, f"r{n:03d}", EPOCH - 1000 + n, EPOCH - 1000 + n, b"{}")
        page = self.fetch(svc, "/reports")
        ids = [row[1] for row in self.sent_rows(page)]
        self.assertEqual(ids, [f"r{n:03d}" for n in range(SENT_ROWS + 2, 2, -1)])
        self.assertIn(f"{SENT_ROWS + 3} kept in spool_dir/sent/", page)
        self.assertIn(f"the {SENT_ROWS} newest are shown, 3 more are not", page)
        # The oldest, not listed, is still shown by its id.
        self.assertEqual(self.fetch(svc, "/reports/r000.json"), "{}")

    def test_a_crafted_id_or_a_link_planted_in_sent_is_refused(self):
        svc = self.make(FakeSupport())
        kept = self.plant(svc, "k", EPOCH - 60, EPOCH - 60, b'{"report_id": "k"}')
        secret = os.path.join(os.path.dirname(svc.sent.directory), "secret.json")
        with open(secret, "w") as f:
            f.write('{"secret": "outside sent/"}')
        os.symlink(secret, os.path.join(svc.sent.directory, file_name(EPOCH, "planted")))
        name = os.path.basename(kept)
        for path in ("/reports/planted.json", "/reports/..%2Fsecret.json",
                     "/reports/..%2F..%2Fsecret.json", "/reports/%2E%2E%2Fsent%2F" + name,
                     f"/reports/{name}", "/reports/k%00.json", "/reports/sent%2Fk.json",
                     "/reports/.json", f"/reports/{'k' * 129}.json"):
            body = self.fetch(svc, path, 404)
            self.assertNotIn("outside sent/", body, path)
        page = self.fetch(svc, "/reports")
        self.assertEqual([row[1] for row in self.sent_rows(page)], ["k"])
        self.assertNotIn("planted", page)
        # sent/ itself a link: nothing is read through it.
        elsewhere = svc.sent.directory + ".elsewhere"
        os.rename(svc.sent.directory, elsewhere)
        os.symlink(elsewhere, svc.sent.directory)
        self.fetch(svc, "/reports/k.json", 404)

    def test_without_sent_the_page_says_delivered_reports_are_not_kept(self):
        page = self.fetch(self.make(), "/reports")
        self.assertIn("Delivered reports are not kept (stand-alone, or sent_keep_days is 0)", page)
        svc = self.make(FakeSupport())
        self.assertIn("None is kept in spool_dir/sent/", self.fetch(svc, "/reports"))

    def test_status_json_counts_the_sent_reports(self):
        self.assertIsNone(self.document(self.make())["sent"])
        svc = self.make(FakeSupport())
        self.assertEqual(self.document(svc)["sent"], {"kept": 0, "bytes": 0, "newest": None})
        self.plant(svc, "a", EPOCH - 300, EPOCH - 200, b"{}")
        self.plant(svc, "b", EPOCH - 400, EPOCH - 100, b"[1]")
        self.assertEqual(self.document(svc)["sent"],
                         {"kept": 2, "bytes": 5, "newest": iso(EPOCH - 100)})
