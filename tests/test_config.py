"""Settings from the JSON file and flags; every error names the key, the value and the fix."""

from __future__ import annotations

import json
import os

from twisted.python import usage
from twisted.trial import unittest

from tempesta_ts import config
from tempesta_ts.tap import Options

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "tap.conf.example")


class ConfigFileTests(unittest.TestCase):
    """Loading and checking the config file."""

    def write(self, content) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return path

    def error(self, content, flags=None, environ=None) -> str:
        path = self.write(content)
        with self.assertRaises(config.ConfigError) as caught:
            config.build(config.load_file(path), flags or {}, environ or {})
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_example_config_loads(self):
        c = config.build(config.load_file(EXAMPLE), {}, {})
        self.assertEqual((c.host, c.port, c.standalone), ("127.0.0.1", 5555, True))

    def test_vendor_example_keys_load(self):
        path = self.write(
            {"host": "192.168.0.1", "port": 5555, "support_host": "173.0.0.0", "support_port": 5556,
             "support_client_id": "my-app-id", "support_api_key": "my-api-key",
             "skip_ssl_verification": False, "log_level": "info"}
        )
        c = config.build(config.load_file(path), {}, {})
        self.assertEqual((c.support_host, c.support_port, c.support_api_key), ("173.0.0.0", 5556, "my-api-key"))

    def test_unknown_key_suggests_the_closest(self):
        message = self.error({"prot": 5555})
        self.assertIn("'prot'", message)
        self.assertIn("did you mean 'port'?", message)

    def test_dashed_key_suggests_the_underscored_name(self):
        self.assertIn("did you mean 'support_host'?", self.error({"support-host": "x"}))

    def test_wrong_type_names_key_value_and_expectation(self):
        message = self.error({"port": "5555"})
        self.assertIn("'port'", message)
        self.assertIn("'5555'", message)
        self.assertIn("expected an integer from 0 to 65535", message)

    def test_port_out_of_range(self):
        message = self.error({"port": 70000})
        self.assertIn("70000 is not valid", message)

    def test_boolean_must_be_a_boolean(self):
        self.assertIn("expected true or false", self.error({"skip_ssl_verification": "no"}))

    def test_unparsable_cidr(self):
        message = self.error({"allowed_sources": ["10.0.0.0/8", "10.0.0.300/24"]})
        self.assertIn("allowed_sources", message)
        self.assertIn("'10.0.0.300/24' does not parse", message)

    def test_listening_host_must_be_an_address(self):
        self.assertIn("IPv4 or IPv6 address", self.error({"host": "localhost.example"}))

    def test_missing_file(self):
        with self.assertRaises(config.ConfigError) as caught:
            config.load_file("/nonexistent/tap.conf")
        self.assertIn("'/nonexistent/tap.conf'", str(caught.exception))
        self.assertIn("No such file or directory", str(caught.exception))

    def test_invalid_json_says_where(self):
        self.assertIn("not valid JSON at line 1 column", self.error('{"port": 5555,}'))

    def test_top_level_must_be_an_object(self):
        self.assertIn("expected a JSON object", self.error("[1, 2]"))

    def test_bad_regex(self):
        message = self.error({"ignore_patterns": ["ok", "(unclosed"]})
        self.assertIn("ignore_patterns", message)
        self.assertIn("(unclosed", message)

    def test_bad_incident_pattern_kind(self):
        message = self.error({"incident_patterns": [{"kind": "panic", "regex": "x"}]})
        self.assertIn("kind 'panic' is not one of them", message)

    def test_missing_ca_file(self):
        self.assertIn("an existing PEM file", self.error({"support_ca_file": "/nonexistent.pem"}))

    def test_support_host_needs_credentials(self):
        self.assertIn("support_client_id: missing", self.error({"support_host": "s.example"}))
        message = self.error({"support_host": "s.example", "support_client_id": "c"})
        self.assertIn("support_api_key: missing", message)

    def test_api_key_is_never_shown(self):
        message = self.error({"support_api_key": 12345678})
        self.assertNotIn("12345678", message)
        self.assertIn("(hidden)", message)
        c = config.Config(support_api_key="sekrit")
        self.assertNotIn("sekrit", json.dumps(c.describe()))

    def test_api_key_from_file_and_environment(self):
        key_file = self.write("key-from-file\n")
        base = {"support_host": "s.example", "support_client_id": "c"}
        c = config.build(base, {"support_api_key_file": key_file}, {})
        self.assertEqual(c.support_api_key, "key-from-file")
        c = config.build(base, {}, {config.API_KEY_ENV: "key-from-env"})
        self.assertEqual(c.support_api_key, "key-from-env")

    def test_clickhouse_is_off_by_default_and_when_the_url_is_empty(self):
        self.assertIsNone(config.build({}, {}, {}).clickhouse_url)
        self.assertIsNone(config.build(config.load_file(self.write({"clickhouse_url": ""})), {}, {}).clickhouse_url)
        c = config.build(config.load_file(self.write({"clickhouse_url": "http://ch.example:8123/"})), {}, {})
        self.assertEqual((c.clickhouse_url, c.clickhouse_database), ("http://ch.example:8123", "tempesta_ts"))

    def test_clickhouse_url_with_a_password_or_a_path_is_refused(self):
        message = self.error({"clickhouse_url": "http://u:pw-in-url@ch.example:8123"})
        self.assertIn("without a user or password (clickhouse_user, clickhouse_password_file)", message)
        self.assertIn("expected an http:// or https:// URL", self.error({"clickhouse_url": "ch.example:8123"}))
        self.assertIn("expected an http:// or https:// URL", self.error({"clickhouse_url": "http://ch/x?y"}))

    def test_clickhouse_database_is_a_plain_name(self):
        message = self.error({"clickhouse_database": "logs; DROP TABLE x"})
        self.assertIn("a database name of letters, digits and _", message)

    def test_clickhouse_password_from_file_and_environment_never_shown(self):
        password_file = self.write("pw-from-file\n")
        c = config.build({}, {"clickhouse_password_file": password_file}, {})
        self.assertEqual(c.clickhouse_password, "pw-from-file")
        c = config.build({}, {}, {config.CLICKHOUSE_PASSWORD_ENV: "pw-from-env"})
        self.assertEqual(c.clickhouse_password, "pw-from-env")
        self.assertNotIn("pw-from-env", json.dumps(c.describe()))
        message = self.error({"clickhouse_password": 12345678})
        self.assertNotIn("12345678", message)
        message = self.error({"clickhouse_password_file": "/nonexistent/pw"})
        self.assertIn("clickhouse_password_file: cannot read '/nonexistent/pw'", message)

    def test_null_keeps_the_default(self):
        c = config.build(config.load_file(self.write({"port": None})), {}, {})
        self.assertEqual(c.port, 5555)


class OptionsTests(unittest.TestCase):
    """The twistd command line: the vendor's flags, flags over file, errors as UsageError."""

    def parse(self, *argv) -> config.Config:
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_vendor_flags(self):
        c = self.parse(
            "--host", "127.0.0.1", "--port", "5555", "--support-host", "support.tfw.dev",
            "--support-port", "443", "--support-client-id", "abc123", "--support-api-key", "xxx-yyy-zzz",
            "--skip-ssl-verification",
        )
        self.assertEqual(
            (c.host, c.port, c.support_host, c.support_client_id, c.support_api_key, c.skip_ssl_verification),
            ("127.0.0.1", 5555, "support.tfw.dev", "abc123", "xxx-yyy-zzz", True),
        )

    def test_flag_overrides_file_and_both_config_names_work(self):
        for name in ("--config", "--config-file"):
            c = self.parse(name, EXAMPLE, "--port", "6000")
            self.assertEqual((c.host, c.port), ("127.0.0.1", 6000))

    def test_file_value_stays_when_flag_not_given(self):
        c = self.parse("--config", EXAMPLE)
        self.assertEqual(c.spool_dir, "spool")

    def test_bad_flag_value_is_a_usage_error_naming_the_flag(self):
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--port", "70000"])
        self.assertIn("--port: '70000' is not valid", str(caught.exception))
        # twistd prints our usage above the error: keep it to one line, not a page.
        self.assertEqual(options.getUsage().count("\n"), 1)

    def test_bad_file_is_a_usage_error(self):
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", "/nonexistent.json"])
        self.assertIn("/nonexistent.json", str(caught.exception))

    def test_help_lists_every_option_with_its_default(self):
        text = Options().getUsage(width=200)
        for key in config.SETTINGS:
            self.assertIn("--" + config.flag_name(key), text)
        self.assertIn("[default: 5555]", text)
        self.assertIn("--config-file", text)

    def test_list_flags(self):
        c = self.parse("--allowed-sources", "10.0.0.0/8, ::1/128", "--incident-patterns", '[{"kind": "error", "regex": "boom"}]')
        self.assertEqual([str(n) for n in c.allowed_sources], ["10.0.0.0/8", "::1/128"])
        self.assertEqual(c.incident_patterns, (("error", "boom"),))


class DocumentationTests(unittest.TestCase):
    """The configuration reference keeps up with the settings table."""

    def test_every_key_is_documented(self):
        with open(os.path.join(os.path.dirname(HERE), "docs", "configuration.md")) as f:
            text = f.read()
        for key in config.SETTINGS:
            self.assertIn(f"| `{key}` | `--{config.flag_name(key)}` |", text)


class SettingsThatDoWhatTheySayTests(unittest.TestCase):
    """Lists as JSON on the command line, booleans turned off by a flag, ineffective settings."""

    def parse(self, *argv) -> Options:
        options = Options()
        options.parseOptions(["--spool-dir", "spool", *argv])
        return options

    def test_a_regex_holding_a_comma_is_one_ignore_pattern(self):
        options = self.parse("--ignore-patterns", r"^WARNING: CPU: \d{1,3} PID: 1 ")
        self.assertEqual(options.config.ignore_patterns, (r"^WARNING: CPU: \d{1,3} PID: 1 ",))

    def test_list_flags_take_a_json_list_as_in_the_file(self):
        options = self.parse("--ignore-patterns", '["a{1,2}", "b"]', "--allowed-sources", '["10.0.0.0/8", "::1"]')
        self.assertEqual(options.config.ignore_patterns, ("a{1,2}", "b"))
        self.assertEqual([str(n) for n in options.config.allowed_sources], ["10.0.0.0/8", "::1/128"])

    def test_a_bad_json_list_flag_names_the_flag(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--allowed-sources", '["10.0.0.0/8"')
        self.assertIn("--allowed-sources:", str(caught.exception))
        self.assertIn("JSON list", str(caught.exception))

    def test_no_flag_turns_off_a_boolean_set_in_the_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"skip_ssl_verification": True}, f)
        self.assertTrue(self.parse("--config", path).config.skip_ssl_verification)
        self.assertFalse(self.parse("--config", path, "--no-skip-ssl-verification").config.skip_ssl_verification)

    def test_a_boolean_and_its_no_flag_together_are_refused(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--skip-ssl-verification", "--no-skip-ssl-verification")
        self.assertIn("both given", str(caught.exception))

    def test_two_config_files_are_refused(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--config", EXAMPLE, "--config-file", "other.json")
        self.assertIn("two config files given", str(caught.exception))

    def test_an_unreadable_ca_file_is_refused_even_with_skip_ssl_verification(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        real_open = open

        def unreadable(name, *args, **kw):
            # chmod 0 does not stop root, who runs these tests in CI: the refusal is simulated.
            if name == path:
                raise PermissionError(13, "Permission denied", name)
            return real_open(name, *args, **kw)

        config.open = unreadable
        self.addCleanup(delattr, config, "open")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--support-ca-file", path, "--skip-ssl-verification")
        self.assertIn("support_ca_file: cannot read", str(caught.exception))

    def test_a_ca_file_with_skip_ssl_verification_is_warned_of(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        options = self.parse("--support-host", "h", "--support-client-id", "c", "--support-api-key", "k",
                             "--support-ca-file", path, "--skip-ssl-verification")
        self.assertTrue(any("is not used: skip_ssl_verification is set" in w for w in options.warnings))

    def test_support_settings_without_support_host_are_warned_of(self):
        options = self.parse("--support-client-id", "c")
        self.assertIn("Stand-alone (no support_host): support_client_id given but not used", options.warnings)
