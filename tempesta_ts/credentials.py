"""Secrets the settings name (the API key, the status token): read from a file holding only
them or from the environment, and warnings where other local users can read them. Pure code."""

from __future__ import annotations

import os
import stat
from typing import Any, Mapping

from tempesta_ts.errors import ConfigError

API_KEY_ENV = "TEMPESTA_TS_SUPPORT_API_KEY"
STATUS_TOKEN_ENV = "TEMPESTA_TS_STATUS_TOKEN"


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


def api_key_exposures(
    config_path: str | None, file_values: Mapping[str, Any], flag_values: Mapping[str, Any],
    config: Any,
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
