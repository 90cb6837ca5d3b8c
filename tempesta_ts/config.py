"""Settings: one table of keys with their types, defaults and help, read from a JSON file and flags.

Every key of the JSON file is also a command-line flag (``support_host`` is ``--support-host``);
a flag overrides the file, the file overrides the default. Pure code: no Twisted.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Mapping

from tempesta_ts.credentials import (
    API_KEY_ENV,
    CLICKHOUSE_PASSWORD_ENV,
    STATUS_TOKEN_ENV,
    api_key_exposures,
    secret_from,
)
from tempesta_ts.errors import ConfigError
from tempesta_ts.incidents import KINDS as INCIDENT_KINDS
from tempesta_ts.setting_kinds import (
    BOOL,
    CIDRS,
    CLICKHOUSE_URL,
    HOST_ADDRESS,
    IDENTIFIER,
    INCIDENT_PATTERNS,
    LOG_LEVELS,
    OFF_OR_PORT,
    PATH,
    PATH_OR_OFF,
    PATTERNS,
    PORT,
    REDACTIONS,
    SUPPORT_PORT,
    TEXT,
    Kind,
    integer,
    log_level,
    number,
)

__all__ = [
    "API_KEY_ENV", "CLICKHOUSE_PASSWORD_ENV", "STATUS_TOKEN_ENV", "ConfigError", "api_key_exposures",
    "CIDRS", "INCIDENT_KINDS", "LOG_LEVELS", "PATTERNS", "REDACTIONS",
]

MiB = 1024 * 1024


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
        "info", log_level(), "debug, info, warn or error; debug logs every message received."
    )
    udp_receive_buffer_bytes: int = _setting(
        8 * MiB,
        integer(65536, 1024 * MiB),
        "UDP socket receive buffer to ask for (the kernel caps it at net.core.rmem_max).",
    )
    buffer_max_lines: int = _setting(10000, integer(1), "Log lines kept per instance.")
    buffer_max_bytes: int = _setting(
        2 * MiB, integer(1024), "Bytes of log text kept per instance."
    )
    max_instances: int = _setting(
        1000, integer(1), "Instances held; the least recently active is dropped first."
    )
    tcp_max_bytes: int = _setting(
        32 * MiB, integer(1024), "Largest document accepted over TCP."
    )
    tcp_idle_seconds: float = _setting(
        30.0, number(0.1, 86400), "A TCP client silent this long is disconnected."
    )
    tcp_max_connections: int = _setting(
        64, integer(1), "TCP clients served at once; more are refused."
    )
    tcp_max_connections_per_source: int = _setting(
        4, integer(1), "TCP clients served at once from one address; more from it are refused."
    )
    tcp_document_seconds: float = _setting(
        60.0,
        number(0.1, 86400),
        "A TCP document must end this long after its connection opened or the previous "
        "document ended, however often bytes come; else it is dropped and the connection closed.",
    )
    system_info_memory_max_bytes: int = _setting(
        64 * MiB,
        integer(1024),
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
        256 * MiB, integer(MiB), "Bound on the spool; the oldest reports are dropped past it."
    )
    sent_keep_days: float = _setting(
        7.0, number(0, 3650, "days"),
        "Days delivered reports are kept in spool_dir/sent/ (0: removed once delivered).",
    )
    sent_max_bytes: int = _setting(
        64 * MiB, integer(0), "Bound on spool_dir/sent/; the oldest kept reports go first past it."
    )
    archive_dir: str | None = _setting(
        None,
        PATH_OR_OFF,
        "Keep every log line on disk here, a file per instance, and rebuild the buffers from it "
        'at start (default: spool_dir/archive; "" turns it off).',
    )
    archive_max_bytes: int = _setting(
        64 * MiB, integer(64 * 1024), "Size of an instance's archive file before it is rotated."
    )
    archive_keep: int = _setting(
        5, integer(0, 1000), "Rotated (gzip-compressed) archive files kept per instance."
    )
    archive_total_max_bytes: int = _setting(
        4096 * MiB,
        integer(MiB),
        "Bound on the whole archive; past it the oldest rotated files go first.",
    )
    settle_seconds: float = _setting(
        5.0, number(0, 3600), "Quiet time after an incident line before its report is sent."
    )
    cooldown_seconds: float = _setting(
        300.0, number(0, 86400), "Repeats of a reported bug (same fingerprint) within this time are folded."
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
        integer(MiB),
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
