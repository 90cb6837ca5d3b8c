"""Settings: one table of keys with their types, defaults and help, read from a JSON file and flags.

Every key of the JSON file is also a command-line flag (``support_host`` is ``--support-host``);
a flag overrides the file, the file overrides the default. Pure code: no Twisted.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from tempesta_ts.credentials import (
    API_KEY_ENV,
    CLICKHOUSE_PASSWORD_ENV,
    STATUS_TOKEN_ENV,
    api_key_exposures,
    secret_from,
)
from tempesta_ts.errors import ConfigError
from tempesta_ts.incidents import KINDS as INCIDENT_KINDS

__all__ = ["API_KEY_ENV", "CLICKHOUSE_PASSWORD_ENV", "STATUS_TOKEN_ENV", "ConfigError",
           "api_key_exposures"]

LOG_LEVELS = ("debug", "info", "warn", "error")
MiB = 1024 * 1024


# Kinds: each parses a value from JSON and from a flag's text, raising ValueError on bad input.


@dataclass(frozen=True)
class Kind:
    """How one setting is typed: what it expects, and parsers for JSON values and flag text."""

    expected: str
    parse_json: Callable[[Any], Any]
    parse_text: Callable[[str], Any]
    is_flag: bool = False


def _integer(lo: int, hi: int | None = None, extra: str = "") -> Kind:
    expected = (
        f"an integer from {lo} to {hi}{extra}" if hi is not None else f"an integer of at least {lo}"
    )

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(expected)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(expected)
        return value

    def from_text(text: str) -> int:
        try:
            return check(int(text.strip().replace("_", ""), 10))
        except ValueError:
            raise ValueError(expected) from None

    return Kind(expected, check, from_text)


def _number(lo: float, hi: float, unit: str = "seconds") -> Kind:
    expected = f"a number of {unit} from {lo:g} to {hi:g}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(expected)
        if not lo <= value <= hi:
            raise ValueError(expected)
        return float(value)

    def from_text(text: str) -> float:
        try:
            return check(float(text))
        except ValueError:
            raise ValueError(expected) from None

    return Kind(expected, check, from_text)


def _boolean() -> Kind:
    expected = "true or false"

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(expected)
        return value

    def from_text(text: str) -> bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(expected)

    return Kind(expected, check, from_text, is_flag=True)


def _text(expected: str = "a non-empty string", check: Callable[[str], str] | None = None) -> Kind:
    def from_json(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(expected)
        return check(value) if check else value

    return Kind(expected, from_json, from_json)


def _choice(choices: tuple[str, ...]) -> Kind:
    expected = "one of " + ", ".join(choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(expected)
        return value.lower()

    return Kind(expected, check, check)


def _log_level() -> Kind:
    # Python's logging (and the vendor's env.json users) spell it "warning".
    base = _choice(LOG_LEVELS)

    def check(value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() == "warning":
            return "warn"
        return base.parse_json(value.strip() if isinstance(value, str) else value)

    return Kind(base.expected + " (warning is warn)", check, check)


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::") from None
    return value


def _list_of(item: Callable[[Any], Any], expected: str, split: bool = True) -> Kind:
    """A list: JSON as in the file, on the command line too; else plain text, split at commas
    (``split``) or taken as one item (a regex may hold a comma)."""

    def from_json(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(expected)
        return tuple(item(v) for v in value)

    def from_text(text: str) -> tuple:
        if text.strip().startswith("["):
            try:
                value = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{expected}, as a JSON list ({e})") from None
            return from_json(value)
        if not split:
            return from_json([text] if text.strip() else [])
        return from_json([part.strip() for part in text.split(",") if part.strip()])

    return Kind(expected, from_json, from_text)


def _cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    expected = "a list of CIDRs such as [\"10.0.0.0/8\", \"2001:db8::/32\"]"
    if not isinstance(value, str):
        raise ValueError(expected)
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{expected}; {value!r} does not parse") from None


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a list of regular expressions (strings)")
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"a list of valid regular expressions; {value!r}: {e}") from None
    return value


def _incident_pattern(value: Any) -> tuple[str, str]:
    expected = (
        'a list of {"kind": K, "regex": R} objects, K one of ' + ", ".join(INCIDENT_KINDS)
    )
    if not isinstance(value, dict) or set(value) != {"kind", "regex"}:
        raise ValueError(expected)
    if value["kind"] not in INCIDENT_KINDS:
        raise ValueError(f"{expected}; kind {value['kind']!r} is not one of them")
    return (value["kind"], _regex(value["regex"]))


def _replacement_checked(pattern: re.Pattern, replacement: str) -> None:
    # A bad group reference (\\2 of a one-group regex) would only fail at the first match.
    try:
        from re import _parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse as parser
    try:
        parser.parse_template(replacement, pattern)
    except re.error as e:
        raise ValueError(
            f"a replacement valid for its regex; {replacement!r} for {pattern.pattern!r}: {e}"
        ) from None
    except (AttributeError, TypeError):  # pragma: no cover - another Python's private API
        pass


def _redaction(value: Any) -> tuple[str, str]:
    expected = 'a list of {"regex": R, "replacement": S} objects'
    if not isinstance(value, dict) or set(value) != {"regex", "replacement"}:
        raise ValueError(expected)
    if not isinstance(value["replacement"], str):
        raise ValueError(f"{expected}; the replacement {value['replacement']!r} is no string")
    regex = _regex(value["regex"])
    _replacement_checked(re.compile(regex), value["replacement"])
    return (regex, value["replacement"])


def _json_list_text(kind: Kind, example: str) -> Callable[[str], tuple]:
    # On the command line such a list is given as JSON, as in the file.
    def from_text(text: str) -> tuple:
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"JSON such as {example}") from None
        return kind.parse_json(value)

    return from_text


def _incident_patterns_text(text: str) -> tuple:
    # On the command line the list is given as JSON, as in the file.
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError('JSON such as [{"kind": "error", "regex": "my module: failed"}]') from None
    return INCIDENT_PATTERNS.parse_json(value)


def _clickhouse_url(value: Any) -> str | None:
    expected = "an http:// or https:// URL such as http://clickhouse.example:8123 (empty: off)"
    if not isinstance(value, str):
        raise ValueError(expected)
    value = value.strip()
    if not value:
        return None
    match = re.fullmatch(r"(https?)://([^/?#@\s]+)/?", value)
    if match is None:
        # A user or password in the URL would be shown wherever the URL is.
        if "@" in value:
            raise ValueError(expected + ", without a user or password (clickhouse_user, "
                             "clickhouse_password_file)")
        raise ValueError(expected)
    return value.rstrip("/")


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
        raise ValueError("a database name of letters, digits and _ such as tempesta_ts")
    return value


PORT = _integer(0, 65535, " (0 picks a free port)")
OFF_OR_PORT = _integer(0, 65535, " (0 turns it off)")
SUPPORT_PORT = _integer(1, 65535)
BOOL = _boolean()
TEXT = _text()
PATH = _text("a path")
HOST_ADDRESS = _text("an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::", _ip_address)
CIDRS = _list_of(_cidr, 'a list of CIDRs such as ["10.0.0.0/8", "2001:db8::/32"]')
PATTERNS = _list_of(_regex, "a list of regular expressions (strings)", split=False)
INCIDENT_PATTERNS = _list_of(_incident_pattern, 'a list of {"kind": K, "regex": R} objects')
INCIDENT_PATTERNS = replace(INCIDENT_PATTERNS, parse_text=_incident_patterns_text)
REDACTIONS = _list_of(_redaction, 'a list of {"regex": R, "replacement": S} objects')
REDACTIONS = replace(REDACTIONS, parse_text=_json_list_text(
    REDACTIONS, '[{"regex": "token=\\\\S+", "replacement": "token=X"}]'))
CLICKHOUSE_URL = Kind(
    "an http:// or https:// URL such as http://clickhouse.example:8123 (empty: off)",
    _clickhouse_url, _clickhouse_url,
)
IDENTIFIER = Kind("a database name of letters, digits and _", _identifier, _identifier)


def _setting(default: Any, kind: Kind, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"kind": kind, "help": help, "secret": secret})


@dataclass(frozen=True)
class Config:
    """The server's settings, validated; one field per JSON key and flag."""

    host: str = _setting("0.0.0.0", HOST_ADDRESS, "Address to listen on, UDP and TCP.")
    port: int = _setting(5555, PORT, "Port to listen on, UDP (netconsole) and TCP (documents).")
    reuse_port: bool = _setting(
        False,
        BOOL,
        "Share host:port with other tempesta-ts processes (SO_REUSEPORT), each with its own "
        "spool_dir and metrics_port and one system_info_dir (docs/operations.md).",
    )
    system_info_dir: str | None = _setting(
        None,
        PATH,
        "Keep system information on disk here too: it survives restarts and is shared by the "
        "processes of reuse_port.",
    )
    allowed_sources: tuple = _setting(
        (), CIDRS, "CIDRs allowed to send, a JSON list or comma-separated (empty: everyone)."
    )
    log_level: str = _setting(
        "info", _log_level(), "debug, info, warn or error; debug logs every message received."
    )
    udp_receive_buffer_bytes: int = _setting(
        8 * MiB,
        _integer(65536, 1024 * MiB),
        "UDP socket receive buffer to ask for (the kernel caps it at net.core.rmem_max).",
    )
    buffer_max_lines: int = _setting(10000, _integer(1), "Log lines kept per instance.")
    buffer_max_bytes: int = _setting(
        2 * MiB, _integer(1024), "Bytes of log text kept per instance."
    )
    max_instances: int = _setting(
        1000, _integer(1), "Instances held; the least recently active is dropped first."
    )
    tcp_max_bytes: int = _setting(
        32 * MiB, _integer(1024), "Largest document accepted over TCP."
    )
    tcp_idle_seconds: float = _setting(
        30.0, _number(0.1, 86400), "A TCP client silent this long is disconnected."
    )
    tcp_max_connections: int = _setting(
        64, _integer(1), "TCP clients served at once; more are refused."
    )
    tcp_max_connections_per_source: int = _setting(
        4, _integer(1), "TCP clients served at once from one address; more from it are refused."
    )
    tcp_document_seconds: float = _setting(
        60.0,
        _number(0.1, 86400),
        "A TCP document must end this long after its connection opened or the previous "
        "document ended, however often bytes come; else it is dropped and the connection closed.",
    )
    system_info_memory_max_bytes: int = _setting(
        64 * MiB,
        _integer(1024),
        "System information held in memory, all instances and documents under way together; "
        "past it documents are kept only in system_info_dir (refused without one).",
    )
    support_host: str | None = _setting(
        None, TEXT, "Support Server host name or address (none: stand-alone)."
    )
    support_port: int = _setting(443, SUPPORT_PORT, "Support Server HTTPS port.")
    support_path: str = _setting("/api/v1/reports", TEXT, "Support Server request path.")
    support_client_id: str | None = _setting(None, TEXT, "Client id sent to the Support Server.")
    support_api_key: str | None = _setting(
        None,
        TEXT,
        f"API key for the Support Server (better: support_api_key_file or ${API_KEY_ENV}).",
        secret=True,
    )
    support_api_key_file: str | None = _setting(None, PATH, "File holding only the API key.")
    support_ca_file: str | None = _setting(
        None, PATH, "PEM bundle to trust for the Support Server instead of the system store."
    )
    skip_ssl_verification: bool = _setting(
        False, BOOL, "Do not verify the Support Server's certificate (self-signed)."
    )
    spool_dir: str = _setting(
        "/var/spool/tempesta-ts", PATH, "Where reports wait for delivery, durable across restarts."
    )
    spool_max_bytes: int = _setting(
        256 * MiB, _integer(MiB), "Bound on the spool; the oldest reports are dropped past it."
    )
    sent_keep_days: float = _setting(
        7.0, _number(0, 3650, "days"),
        "Days delivered reports are kept in spool_dir/sent/ (0: removed once delivered).",
    )
    sent_max_bytes: int = _setting(
        64 * MiB, _integer(0), "Bound on spool_dir/sent/; the oldest kept reports go first past it."
    )
    settle_seconds: float = _setting(
        5.0, _number(0, 3600), "Quiet time after an incident line before its report is sent."
    )
    cooldown_seconds: float = _setting(
        300.0, _number(0, 86400), "Repeats of a reported bug (same fingerprint) within this time are folded."
    )
    incident_patterns: tuple = _setting(
        (), INCIDENT_PATTERNS, 'Extra incident rules, JSON: [{"kind": K, "regex": R}, ...].'
    )
    ignore_patterns: tuple = _setting(
        (), PATTERNS, "Regexes of lines that never start an incident; a flag takes a JSON list, or one regex as is.",
    )
    metrics_host: str = _setting("127.0.0.1", HOST_ADDRESS, "Address of the metrics endpoint.")
    metrics_port: int = _setting(9478, OFF_OR_PORT, "Port of the /metrics endpoint.")
    status_token: str | None = _setting(
        None,
        TEXT,
        "Token that lets non-loopback clients read the pages showing log text and reports "
        f"(better: status_token_file or ${STATUS_TOKEN_ENV}); without it only loopback may.",
        secret=True,
    )
    status_token_file: str | None = _setting(None, PATH, "File holding only the status token.")
    report_redactions: tuple = _setting(
        (),
        REDACTIONS,
        'Rewrites applied to what a report sends (log lines, incidents, system information), '
        'JSON: [{"regex": R, "replacement": S}, ...].',
    )
    report_exclude_patterns: tuple = _setting(
        (), PATTERNS, "Regexes of log lines never sent in a report, comma-separated."
    )
    clickhouse_url: str | None = _setting(
        None, CLICKHOUSE_URL,
        "ClickHouse HTTP interface to send every log line and incident to (none: off).",
    )
    clickhouse_database: str = _setting(
        "tempesta_ts", IDENTIFIER, "ClickHouse database; it and its tables are made if missing."
    )
    clickhouse_user: str | None = _setting(None, TEXT, "ClickHouse user (none: ClickHouse's default).")
    clickhouse_password: str | None = _setting(
        None,
        TEXT,
        "ClickHouse password (better: clickhouse_password_file or "
        f"${CLICKHOUSE_PASSWORD_ENV}).",
        secret=True,
    )
    clickhouse_password_file: str | None = _setting(
        None, PATH, "File holding only the ClickHouse password."
    )
    clickhouse_queue_max_bytes: int = _setting(
        64 * MiB,
        _integer(MiB),
        "Rows waiting for ClickHouse (while it is away); past it the oldest are dropped.",
    )

    @property
    def standalone(self) -> bool:
        """True when reports are written locally instead of sent to a Support Server."""
        return self.support_host is None

    def describe(self) -> dict[str, Any]:
        """The settings as a dict fit to show, with secrets masked."""
        shown = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value is not None:
                value = "********"
            elif f.name == "allowed_sources":
                value = [str(n) for n in value]
            shown[f.name] = value
        return shown


SETTINGS = {f.name: f for f in fields(Config)}


def kind_of(key: str) -> Kind:
    """The Kind of a setting."""
    return SETTINGS[key].metadata["kind"]


def default_of(key: str) -> Any:
    """The default of a setting."""
    f = SETTINGS[key]
    return None if f.default is MISSING else f.default


def is_secret(key: str) -> bool:
    """Whether a setting's value must never be shown."""
    return SETTINGS[key].metadata["secret"]


def flag_name(key: str) -> str:
    """The command-line flag of a setting: support_host is support-host."""
    return key.replace("_", "-")


def bad_value(where: str, key: str, value: Any, expected: str) -> ConfigError:
    """The one-line error for a bad value; a secret's value is never shown."""
    shown = "(hidden)" if key in SETTINGS and is_secret(key) else _show(value)
    return ConfigError(f"{where}: {shown} is not valid; expected {expected}")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_file(path: str) -> dict[str, Any]:
    """Read and type-check a JSON config file; raise ConfigError naming the key and the fix."""
    where = f"config file {path!r}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(
            f"{where}: cannot read it ({e.strerror}); give a readable JSON file with --config"
        ) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object {{\"key\": value, ...}} at the top")
    values = {}
    for key, value in data.items():
        if key not in SETTINGS:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key)}")
        if value is None:
            # null keeps the default, so a template can list every key.
            continue
        try:
            values[key] = kind_of(key).parse_json(value)
        except ValueError as e:
            raise bad_value(f"{where}: key {key!r}", key, value, str(e)) from None
    return values


def _suggest(key: str) -> str:
    normalised = key.strip().lower().replace("-", "_")
    if normalised in SETTINGS:
        return f"; did you mean {normalised!r}?"
    close = difflib.get_close_matches(normalised, list(SETTINGS), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; see 'twistd tempesta-ts --help' for the keys"


def parse_flag(key: str, text: str) -> Any:
    """Parse a flag's text for a setting; raise ConfigError naming the flag."""
    try:
        return kind_of(key).parse_text(text)
    except ValueError as e:
        raise bad_value(f"--{flag_name(key)}", key, text, str(e)) from None


def build(
    file_values: Mapping[str, Any],
    flag_values: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Merge defaults, file and flags (in that order of precedence) and check the whole."""
    values = {**file_values, **flag_values}
    config = Config(**values)
    if config.support_api_key is None:
        key = secret_from("support_api_key_file", config.support_api_key_file, API_KEY_ENV,
                          environ, "the API key")
        config = replace(config, support_api_key=key)
    if config.status_token is None:
        token = secret_from("status_token_file", config.status_token_file, STATUS_TOKEN_ENV,
                            environ, "the token")
        config = replace(config, status_token=token)
    if config.clickhouse_password is None:
        password = secret_from("clickhouse_password_file", config.clickhouse_password_file,
                               CLICKHOUSE_PASSWORD_ENV, environ, "the password")
        config = replace(config, clickhouse_password=password)
    _check(config)
    return config


def ineffective_settings(config: Config, given: Mapping[str, Any]) -> list[str]:
    """Warnings for settings given (in the file or by a flag) that cannot take effect."""
    warnings = []
    if config.support_ca_file is not None and config.skip_ssl_verification:
        warnings.append(
            f"support_ca_file {config.support_ca_file!r} is not used: skip_ssl_verification is "
            "set, so no certificate is checked; remove one of the two"
        )
    if config.standalone:
        unused = sorted(
            k for k, v in given.items()
            if (k.startswith("support_") or k == "skip_ssl_verification") and v != default_of(k)
            # The key's own warnings (api_key_exposures) say what matters about it.
            and not k.startswith("support_api_key")
        )
        if unused:
            warnings.append(
                "Stand-alone (no support_host): " + ", ".join(unused) + " given but not used"
            )
    return warnings


def _check(config: Config) -> None:
    if config.support_host is not None:
        if config.support_client_id is None:
            raise ConfigError(
                "support_client_id: missing; expected the client id given by the vendor "
                "when support_host is set (or remove support_host to run stand-alone)"
            )
        if config.support_api_key is None:
            raise ConfigError(
                "support_api_key: missing; expected the API key in support_api_key_file, "
                f"${API_KEY_ENV} or support_api_key when support_host is set"
            )
    if not config.support_path.startswith("/"):
        raise bad_value("support_path", "support_path", config.support_path, "a path starting with /")
    if config.support_ca_file is not None:
        if not os.path.isfile(config.support_ca_file):
            raise bad_value(
                "support_ca_file",
                "support_ca_file",
                config.support_ca_file,
                "an existing PEM file of CA certificates",
            )
        try:
            with open(config.support_ca_file, "rb"):
                pass
        except OSError as e:
            # Even when skip_ssl_verification makes it unused: a file named must be usable.
            raise ConfigError(
                f"support_ca_file: cannot read {config.support_ca_file!r} ({e.strerror}); "
                "expected a readable PEM file of CA certificates"
            ) from None
    if config.reuse_port and config.system_info_dir is None:
        raise ConfigError(
            "system_info_dir: missing; expected a directory shared by every process on the port "
            "when reuse_port is set (an instance's documents may reach another process than its log)"
        )
    if config.metrics_port != 0 and config.metrics_port == config.port and (
        config.metrics_host == config.host or config.host in ("0.0.0.0", "::")
    ):
        raise ConfigError(
            f"metrics_port: {config.metrics_port} is the listening port too; "
            "expected another port, or 0 to turn metrics off"
        )
