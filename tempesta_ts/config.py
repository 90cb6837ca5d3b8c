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
import stat
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Mapping

API_KEY_ENV = "TEMPESTA_TS_SUPPORT_API_KEY"
INCIDENT_KINDS = ("crash", "oops", "bug", "warning", "error")
LOG_LEVELS = ("debug", "info", "warn", "error")
MiB = 1024 * 1024


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the value and what is expected."""


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


def _number(lo: float, hi: float) -> Kind:
    expected = f"a number of seconds from {lo:g} to {hi:g}"

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


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::") from None
    return value


def _list_of(item: Callable[[Any], Any], expected: str) -> Kind:
    def from_json(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(expected)
        return tuple(item(v) for v in value)

    def from_text(text: str) -> tuple:
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


def _incident_patterns_text(text: str) -> tuple:
    # On the command line the list is given as JSON, as in the file.
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError('JSON such as [{"kind": "error", "regex": "my module: failed"}]') from None
    return INCIDENT_PATTERNS.parse_json(value)


PORT = _integer(0, 65535, " (0 picks a free port)")
OFF_OR_PORT = _integer(0, 65535, " (0 turns it off)")
SUPPORT_PORT = _integer(1, 65535)
BOOL = _boolean()
TEXT = _text()
PATH = _text("a path")
PATH_OR_OFF = _path_or_off()
HOST_ADDRESS = _text("an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::", _ip_address)
CIDRS = _list_of(_cidr, 'a list of CIDRs such as ["10.0.0.0/8", "2001:db8::/32"]')
PATTERNS = _list_of(_regex, "a list of regular expressions (strings)")
INCIDENT_PATTERNS = _list_of(_incident_pattern, 'a list of {"kind": K, "regex": R} objects')
INCIDENT_PATTERNS = replace(INCIDENT_PATTERNS, parse_text=_incident_patterns_text)


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
        (), CIDRS, "CIDRs allowed to send, comma-separated (empty: everyone)."
    )
    log_level: str = _setting(
        "info", _choice(LOG_LEVELS), "debug, info, warn or error; debug logs every message received."
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
    archive_dir: str | None = _setting(
        None,
        PATH_OR_OFF,
        "Keep every log line on disk here, a file per instance, and rebuild the buffers from it "
        'at start (default: spool_dir/archive; "" turns it off).',
    )
    archive_max_bytes: int = _setting(
        64 * MiB, _integer(64 * 1024), "Size of an instance's archive file before it is rotated."
    )
    archive_keep: int = _setting(
        5, _integer(0, 1000), "Rotated (gzip-compressed) archive files kept per instance."
    )
    archive_total_max_bytes: int = _setting(
        4096 * MiB,
        _integer(MiB),
        "Bound on the whole archive; past it the oldest rotated files go first.",
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
        (), PATTERNS, "Regexes of lines that never start an incident, comma-separated."
    )
    metrics_host: str = _setting("127.0.0.1", HOST_ADDRESS, "Address of the metrics endpoint.")
    metrics_port: int = _setting(9478, OFF_OR_PORT, "Port of the /metrics endpoint.")

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
        config = replace(config, support_api_key=_api_key_from(config, environ))
    _check(config)
    return config


def api_key_exposures(
    config_path: str | None, file_values: Mapping[str, Any], flag_values: Mapping[str, Any],
    config: Config,
) -> list[str]:
    """Warnings for an API key that other local users can read; the key itself is never named."""
    better = (
        f"support_api_key_file (mode 600), ${API_KEY_ENV} or systemd's LoadCredential "
        "(see contrib/tempesta-ts.service)"
    )
    warnings = []
    if "support_api_key" in flag_values:
        warnings.append(
            "The API key is given with --support-api-key, where any local user can read it "
            f"(ps, /proc); give it in {better}"
        )
    mode = _world_readable(config_path) if "support_api_key" in file_values else None
    if mode is not None:
        warnings.append(
            f"Config file {config_path!r} holds support_api_key and any local user can read it "
            f"(mode {mode:04o}); chmod 600 it, or move the key to {better}"
        )
    mode = _world_readable(config.support_api_key_file)
    if mode is not None:
        warnings.append(
            f"support_api_key_file {config.support_api_key_file!r} can be read by any local "
            f"user (mode {mode:04o}); chmod 600 it, or give it with systemd's LoadCredential"
        )
    return warnings


def _world_readable(path: str | None) -> int | None:
    """The permission bits of a file that others may read, else None."""
    if path is None:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return stat.S_IMODE(mode) if mode & stat.S_IROTH else None


def _api_key_from(config: Config, environ: Mapping[str, str]) -> str | None:
    if config.support_api_key_file is not None:
        path = config.support_api_key_file
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise ConfigError(
                f"support_api_key_file: cannot read {path!r} ({reason}); "
                "expected a readable file holding only the API key"
            ) from None
        if not key:
            raise ConfigError(
                f"support_api_key_file: {path!r} is empty; expected a file holding the API key"
            )
        return key
    return environ.get(API_KEY_ENV) or None


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
    if config.support_ca_file is not None and not os.path.isfile(config.support_ca_file):
        raise bad_value(
            "support_ca_file",
            "support_ca_file",
            config.support_ca_file,
            "an existing PEM file of CA certificates",
        )
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
