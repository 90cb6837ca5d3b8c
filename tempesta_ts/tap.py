"""``twistd tempesta-ts``: the command-line options and the service maker."""

from __future__ import annotations

import os
import sys
from typing import Mapping

from twisted.python import usage

from tempesta_ts import config as settings
from tempesta_ts import log
from tempesta_ts.errors import StartupError
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.status import systemd_status
from tempesta_ts.systemd import SystemdNotifier

_log = log.get_logger(__name__)


def _coerce(key: str):
    def coerce(text: str):
        try:
            return settings.parse_flag(key, text)
        except settings.ConfigError as e:
            raise usage.UsageError(str(e)) from None

    coerce.__name__ = f"coerce_{key}"
    return coerce


def _help(key: str) -> str:
    default = settings.default_of(key)
    if default in (None, ()):
        return settings.SETTINGS[key].metadata["help"]
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"{settings.SETTINGS[key].metadata['help']} [default: {default}]"


class Options(usage.Options):
    """Every key of the JSON config file as a flag; a flag given here overrides the file."""

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "Collects the kernel logs that Tempesta FW servers send with netconsole (UDP) and "
        "their system information (TCP), and reports incidents to the Support Server. "
        "Settings come from --config (JSON, the same names with underscores) and flags."
    )
    optFlags = [
        [settings.flag_name(key), None, _help(key)]
        for key in settings.SETTINGS
        if settings.kind_of(key).is_flag
    ]
    # Defaults stay None here so that a flag not given does not override the file.
    optParameters = [
        [settings.flag_name(key), None, None, _help(key), _coerce(key)]
        for key in settings.SETTINGS
        if not settings.kind_of(key).is_flag
    ]

    def __init__(self) -> None:
        super().__init__()
        self["config"] = None
        self.config: settings.Config | None = None
        #: What to warn of once logging runs (an API key that others can read).
        self.warnings: list[str] = []
        self._failed = False

    def opt_config(self, path: str) -> None:
        """JSON config file (also --config-file)."""
        self["config"] = path

    def opt_config_file(self, path: str) -> None:
        """The same as --config (the vendor's name)."""
        self["config"] = path

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError:
            # twistd prints our usage before the error; a page of help would bury the line.
            self._failed = True
            raise

    def postOptions(self) -> None:
        given = {}
        for key in settings.SETTINGS:
            value = self[settings.flag_name(key)]
            if settings.kind_of(key).is_flag:
                if value:
                    given[key] = True
            elif value is not None:
                given[key] = value
        try:
            from_file = settings.load_file(self["config"]) if self["config"] else {}
            self.config = settings.build(from_file, given)
        except settings.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.warnings = settings.api_key_exposures(self["config"], from_file, given, self.config)

    def getUsage(self, width: int | None = None) -> str:
        if self._failed:
            return "Run 'twistd tempesta-ts --help' to list the options.\n"
        return super().getUsage(width)


def makeService(
    options: Options, reactor=None, environ: Mapping[str, str] | None = None
) -> TroubleshootingService:
    """The server as configured; ``reactor`` and ``environ`` are for tests."""
    if reactor is None:
        from twisted.internet import reactor
    log.set_level(options.config.log_level)
    # twistd starts its log observers only after makeService; until then the global log
    # beginner keeps these events and shows them first.
    for warning in options.warnings:
        _log.warn(warning)
    _report_startup_errors_in_one_line()
    try:
        server = TroubleshootingService(options.config, reactor)
    except settings.ConfigError as e:
        # What only shows when it is used (a CA bundle that does not parse).
        raise StartupError(str(e)) from None
    environ = os.environ if environ is None else environ
    status = server.status.listening
    SystemdNotifier(reactor, environ, lambda: systemd_status(status())).setServiceParent(server)
    return server


def _report_startup_errors_in_one_line() -> None:
    # twistd lets an exception from privilegedStartService (a port that cannot be bound) end
    # the process with a traceback; the operator needs the one line that says why.
    previous = sys.excepthook
    if getattr(previous, "_tempesta_ts", False):
        return

    def hook(kind, value, tb):
        if isinstance(value, StartupError):
            sys.stderr.write(f"tempesta-ts: {value}\n")
        else:
            previous(kind, value, tb)

    hook._tempesta_ts = True
    sys.excepthook = hook
