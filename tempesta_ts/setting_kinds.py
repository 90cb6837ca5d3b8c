"""The kinds of value a setting takes: what each expects, and how it is read from JSON and from
a flag's text (raising ValueError, with what was expected, on bad input). Pure code."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

from tempesta_ts.incidents import KINDS as INCIDENT_KINDS

LOG_LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class Kind:
    """How one setting is typed: what it expects, and parsers for JSON values and flag text."""

    expected: str
    parse_json: Callable[[Any], Any]
    parse_text: Callable[[str], Any]
    is_flag: bool = False


def integer(lo: int, hi: int | None = None, extra: str = "") -> Kind:
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


def number(lo: float, hi: float, unit: str = "seconds") -> Kind:
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


def _path_or_off() -> Kind:
    expected = 'a path, or "" to turn it off'

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(expected)
        return value.strip() and value

    return Kind(expected, check, check)


def _choice(choices: tuple[str, ...]) -> Kind:
    expected = "one of " + ", ".join(choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(expected)
        return value.lower()

    return Kind(expected, check, check)


def log_level() -> Kind:
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


PORT = integer(0, 65535, " (0 picks a free port)")
OFF_OR_PORT = integer(0, 65535, " (0 turns it off)")
SUPPORT_PORT = integer(1, 65535)
BOOL = _boolean()
TEXT = _text()
PATH = _text("a path")
PATH_OR_OFF = _path_or_off()
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
