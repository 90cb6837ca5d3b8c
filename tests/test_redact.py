"""What leaves the site: report_redactions and report_exclude_patterns rewrite and leave out
lines of every report before it is spooled, while the buffers keep the original."""

from __future__ import annotations

import json
from collections import Counter

from twisted.internet import task
from twisted.trial import unittest

from tempesta_ts import config
from tempesta_ts.buffers import SystemInfo
from tempesta_ts.config import Config
from tempesta_ts.pipeline import build_pipeline
from tempesta_ts.redact import EXCLUDED, Redactor
from tests.test_pipeline import Kept

HOST = "192.0.2.10"
ACCESS = b'[   9.000000] [tempesta fw] 203.0.113.7 "shop" "GET /cart?user=alice HTTP/1.1" 200 1234 "-" "curl/8.0"\n'
WARNING = (b"[   10.000000] WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 "
           b"dev_queue_xmit+0x1/0x2 from 198.51.100.4\n")
IPV4 = {"regex": r"\b(?:\d{1,3}\.){3}\d{1,3}\b", "replacement": "x.x.x.x"}
# docs/configuration.md's recipe: "::" or eight groups, so that times (10:00:05) and MAC
# addresses stay as they are.
IPV6 = {
    "regex": r"(?<![\w:.])(?=[0-9A-Fa-f:]*::|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f])"
             r"[0-9A-Fa-f:]{2,39}(?![\w:])",
    "replacement": "x:x::x",
}


class RedactionSettingsTests(unittest.TestCase):
    """The keys are checked at start, each error one line naming the bad regex."""

    def error(self, key, value) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({key: value}, f)
        with self.assertRaises(config.ConfigError) as caught:
            config.build(config.load_file(path), {}, {})
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_a_bad_redaction_regex_is_named(self):
        message = self.error("report_redactions", [{"regex": "user=(", "replacement": "user="}])
        self.assertIn("'user=('", message)
        self.assertIn("report_redactions", message)

    def test_a_replacement_naming_a_missing_group_is_refused_at_start(self):
        message = self.error("report_redactions", [{"regex": "user=\\w+", "replacement": "\\1"}])
        self.assertIn("invalid group reference 1", message)

    def test_a_redaction_must_be_regex_and_replacement(self):
        message = self.error("report_redactions", [{"regex": "a"}])
        self.assertIn('{"regex": R, "replacement": S}', message)

    def test_a_bad_exclude_pattern_is_named(self):
        message = self.error("report_exclude_patterns", ["\\[tempesta fw\\] (["])
        self.assertIn("report_exclude_patterns", message)
        self.assertIn("'\\\\[tempesta fw\\\\] ([' ", message.replace(":", " "))

    def test_the_command_line_takes_redactions_as_json(self):
        value = config.parse_flag("report_redactions", json.dumps([IPV4]))
        self.assertEqual(value, ((IPV4["regex"], IPV4["replacement"]),))


class RedactorTests(unittest.TestCase):
    """The pure rewrite of one report body."""

    def test_log_incidents_and_system_info_are_rewritten_and_the_original_untouched(self):
        report = {
            "log": [{"text": "from 10.1.2.3 and 2001:db8::1:2", "seq": 1}],
            "incidents": [{"line": "oops at 10.1.2.3", "title": "oops in 10.1.2.3"}],
            "system_info": {"received_at": "t", "text": '{"ip": "10.9.9.9"}\n{"b": 1}\n'},
        }
        original = json.loads(json.dumps(report))
        redactor = Redactor([(IPV4["regex"], IPV4["replacement"]), (IPV6["regex"], IPV6["replacement"])])
        out = redactor(report)
        self.assertEqual(out["log"], [{"text": "from x.x.x.x and x:x::x", "seq": 1}])
        self.assertEqual(out["incidents"], [{"line": "oops at x.x.x.x", "title": "oops in x.x.x.x"}])
        self.assertEqual(out["system_info"]["text"], '{"ip": "x.x.x.x"}\n{"b": 1}\n')
        self.assertEqual(report, original)

    def test_excluded_lines_are_left_out_and_an_excluded_incident_line_is_replaced(self):
        redactor = Redactor(excludes=[r"\[tempesta fw\] "])
        out = redactor({
            "log": [{"text": "[tempesta fw] 192.0.2.1 \"GET /\""}, {"text": "kept"}],
            "incidents": [{"line": "[tempesta fw] Warning: x", "title": "t"}],
            "system_info": None,
        })
        self.assertEqual(out["log"], [{"text": "kept"}])
        self.assertEqual(out["incidents"], [{"line": EXCLUDED, "title": "t"}])

    def test_nothing_configured_makes_no_redactor(self):
        self.assertIsNone(Redactor.of(Config()))


class ReportMakerTests(unittest.TestCase):
    """Applied by the report maker: the sinks get the redacted report, the buffer keeps all."""

    def test_the_sinks_get_the_redacted_report_and_the_buffer_keeps_the_original(self):
        clock, kept = task.Clock(), Kept()
        settings = Config(
            settle_seconds=1.0,
            report_redactions=((IPV4["regex"], IPV4["replacement"]),),
            report_exclude_patterns=(r"\[tempesta fw\] ",),
        )
        pipeline = build_pipeline(settings, clock, Counter(), [kept])
        pipeline.registry.receive_datagram(HOST, ACCESS, clock.seconds())
        instance = pipeline.registry.get(HOST)
        instance.system_info = SystemInfo(0.0, '{"mgmt": "10.0.0.1"}', "json")
        pipeline.registry.receive_datagram(HOST, WARNING, clock.seconds())
        clock.advance(2)
        [report] = kept.reports
        texts = [entry["text"] for entry in report["log"]]
        self.assertEqual(len(texts), 1)
        self.assertIn("from x.x.x.x", texts[0])
        self.assertNotIn("203.0.113.7", json.dumps(report))
        self.assertNotIn("198.51.100.4", json.dumps(report))
        self.assertEqual(report["system_info"]["text"], '{"mgmt": "x.x.x.x"}')
        self.assertEqual(report["instance"]["address"], HOST)
        buffered = [line.text for line in instance.buffer]
        self.assertIn("203.0.113.7", buffered[0])
        self.assertIn("198.51.100.4", buffered[1])


class RecipeTests(unittest.TestCase):
    """docs/configuration.md's recipes do what it says, on the lines it shows."""

    def recipes(self) -> list:
        import os
        import re

        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "configuration.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        blocks = re.findall(r"```json\n(.*?)```", text, re.S)
        return [json.loads("{" + block + "}") for block in blocks]

    def test_the_access_log_recipes_leave_out_or_hide_the_client(self):
        exclude, rewrite, addresses = self.recipes()
        line = ACCESS.decode().split("] ", 1)[1].rstrip("\n")
        redactor = Redactor(excludes=config.PATTERNS.parse_json(exclude["report_exclude_patterns"]))
        self.assertTrue(redactor.excluded(line))
        self.assertFalse(redactor.excluded("[tempesta fw] Warning: frang: too many requests"))
        redactor = Redactor(config.REDACTIONS.parse_json(rewrite["report_redactions"]))
        self.assertEqual(
            redactor.line(line), '[tempesta fw] client "shop" "GET /cart HTTP/1.1" 200 1234 "-" "-"'
        )
        redactor = Redactor(config.REDACTIONS.parse_json(addresses["report_redactions"]))
        self.assertEqual(
            redactor.line("frang: 192.0.2.1 and [2001:db8::7]:443 at 10:00:05 mac aa:bb:cc:dd:ee:ff"),
            "frang: x.x.x.x and [x:x::x]:443 at 10:00:05 mac aa:bb:cc:dd:ee:ff",
        )
