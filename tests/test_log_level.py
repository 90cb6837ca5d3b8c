"""log_level "warning" is Python logging's (and the vendor's env.json users') word for warn."""

from __future__ import annotations

import json

from twisted.trial import unittest

from tempesta_ts import config
from tempesta_ts.tap import Options


class WarningLevelTests(unittest.TestCase):
    """"warning" is taken as warn, in the file and on the command line."""

    def test_warning_in_the_file_is_warn(self):
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"log_level": "warning"}, f)
        self.assertEqual(config.build(config.load_file(path), {}, {}).log_level, "warn")

    def test_warning_on_the_command_line_is_warn_whatever_its_case(self):
        options = Options()
        options.parseOptions(["--log-level", "WARNING"])
        self.assertEqual(options.config.log_level, "warn")

    def test_an_unknown_level_still_names_the_choices(self):
        with self.assertRaises(config.ConfigError) as caught:
            config.parse_flag("log_level", "loud")
        self.assertIn("one of debug, info, warn, error", str(caught.exception))
