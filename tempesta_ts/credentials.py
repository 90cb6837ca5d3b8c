"""Secrets the settings name (the API key, the status token): read from a file holding only
them or from the environment, and warnings where other local users can read them. Pure code."""

from __future__ import annotations

import os
import stat
from typing import Any, Mapping

from tempesta_ts.errors import ConfigError

API_KEY_ENV = "TEMPESTA_TS_SUPPORT_API_KEY"
STATUS_TOKEN_ENV = "TEMPESTA_TS_STATUS_TOKEN"
CLICKHOUSE_PASSWORD_ENV = "TEMPESTA_TS_CLICKHOUSE_PASSWORD"


def secret_from(key: str, path: str | None, env: str, environ: Mapping[str, str],
                what: str) -> str | None:
    """The secret in the file the setting `key` names (`path`), else in `environ[env]`, else
    None; ConfigError naming `key` when the file cannot be read or is empty."""
    if path is None:
        return environ.get(env) or None
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            f"{key}: cannot read {path!r} ({reason}); expected a readable file holding only {what}"
        ) from None
    if not secret:
        raise ConfigError(f"{key}: {path!r} is empty; expected a file holding {what}")
    return secret


#: Secret settings warned of: (key, its file's key, what it is, its environment variable).
SECRETS = (
    ("support_api_key", "support_api_key_file", "The API key", API_KEY_ENV),
    ("clickhouse_password", "clickhouse_password_file", "The ClickHouse password",
     CLICKHOUSE_PASSWORD_ENV),
)


def api_key_exposures(
    config_path: str | None, file_values: Mapping[str, Any], flag_values: Mapping[str, Any],
    config: Any,
) -> list[str]:
    """Warnings for an API key (or the ClickHouse password) that other local users can read;
    the secret itself is never named."""
    warnings = []
    for key, file_key, what, variable in SECRETS:
        better = (
            f"{file_key} (mode 600), ${variable} or systemd's LoadCredential "
            "(see contrib/tempesta-ts.service)"
        )
        if key in flag_values:
            warnings.append(
                f"{what} is given with --{key.replace('_', '-')}, where any local user can read "
                f"it (ps, /proc); give it in {better}"
            )
        mode = _world_readable(config_path) if key in file_values else None
        if mode is not None:
            warnings.append(
                f"Config file {config_path!r} holds {key} and any local user can read it "
                f"(mode {mode:04o}); chmod 600 it, or move {what[0].lower() + what[1:]} to {better}"
            )
        path = getattr(config, file_key)
        mode = _world_readable(path)
        if mode is not None:
            warnings.append(
                f"{file_key} {path!r} can be read by any local "
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
