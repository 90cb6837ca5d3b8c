"""``twistd tempesta-ts``: the command-line options and the service maker."""

from __future__ import annotations

import os
import sys
from typing import Mapping

from twisted.python import usage

from tempesta_ts import __version__, log
from tempesta_ts import config as settings
from tempesta_ts.clock import ClockWatch, use_monotonic_time
from tempesta_ts.errors import StartupError
from tempesta_ts.reload import Signals
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.status import systemd_status
from tempesta_ts.systemd import SystemdNotifier
from twisted import version as twisted_version

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
    ] + [
        # A flag cannot take a value in twisted.python.usage: --no-KEY turns a boolean off
        # over the file.
        ["no-" + settings.flag_name(key), None, f"Turn {settings.flag_name(key)} off."]
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
        if self["config"] is not None and self["config"] != path:
            raise usage.UsageError(
                f"--config/--config-file: two config files given ({self['config']!r} and "
                f"{path!r}); expected one"
            )
        self["config"] = path

    def opt_config_file(self, path: str) -> None:
        """The same as --config (the vendor's name)."""
        self.opt_config(path)

    def opt_version(self) -> None:
        """Display tempesta-ts's version and exit."""
        sys.stdout.write(f"tempesta-ts {__version__} (Twisted {twisted_version.short()})\n")
        raise SystemExit(0)

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            self._failed = True
            if getattr(self, "parent", None) is not None:
                # Under twistd: its handler would print "Usage: twistd [options]" first; the
                # operator needs the one line (before any daemonising, so it is whole).
                raise SystemExit(f"tempesta-ts: {e}") from None
            raise

    def postOptions(self) -> None:
        given = {}
        for key in settings.SETTINGS:
            value = self[settings.flag_name(key)]
            if settings.kind_of(key).is_flag:
                off = self["no-" + settings.flag_name(key)]
                if value and off:
                    raise usage.UsageError(
                        f"--{settings.flag_name(key)} and --no-{settings.flag_name(key)}: "
                        "both given; expected one"
                    )
                if value or off:
                    given[key] = bool(value)
            elif value is not None:
                given[key] = value
        try:
            from_file = settings.load_file(self["config"]) if self["config"] else {}
            self.config = settings.build(from_file, given)
        except settings.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        #: The flags given, applied again over the file on each reload (SIGHUP).
        self.given = given
        self.warnings = settings.api_key_exposures(self["config"], from_file, given, self.config)
        self.warnings += settings.ineffective_settings(self.config, {**from_file, **given})

    def getUsage(self, width: int | None = None) -> str:
        if self._failed:
            return "Run 'twistd tempesta-ts --help' to list the options.\n"
        return super().getUsage(width)


def makeService(
    options: Options, reactor=None, environ: Mapping[str, str] | None = None
) -> TroubleshootingService:
    """The server as configured; ``reactor`` and ``environ`` are for tests."""
    watch = None
    if reactor is None:
        from twisted.internet import reactor

        # The server's own reactor: its timers ignore wall-clock steps (tempesta_ts/clock.py).
        use_monotonic_time(reactor)
        watch = ClockWatch(reactor)
    log.set_level(options.config.log_level)
    # twistd starts its log observers only after makeService; until then the global log
    # beginner keeps these events and shows them first.
    for warning in options.warnings:
        _log.warn(warning)
    _report_startup_errors_in_one_line(reactor)
    try:
        server = TroubleshootingService(options.config, reactor, config_file=options["config"])
    except settings.ConfigError as e:
        # What only shows when it is used (a CA bundle that does not parse).
        raise StartupError(str(e)) from None
    path, given = options["config"], dict(options.given)
    Signals(
        reactor, path,
        load=lambda: settings.build(settings.load_file(path) if path else {}, given),
        current=lambda: server.config, apply=server.reconfigure,
    ).setServiceParent(server)
    if watch is not None:
        watch.setServiceParent(server)
    environ = os.environ if environ is None else environ
    status = server.status.listening
    SystemdNotifier(reactor, environ, lambda: systemd_status(status())).setServiceParent(server)
    return server


def _report_startup_errors_in_one_line(reactor) -> None:
    # twistd lets an exception from privilegedStartService (a port that cannot be bound) end
    # the process with a traceback; the operator needs the one line that says why. Daemonised,
    # twistd has sent standard error to /dev/null by then and passes only 100 bytes of the
    # error to the parent: a copy of the terminal's standard error, taken now (before the
    # fork), gets the whole line; it is closed once the server runs.
    previous = sys.excepthook
    if getattr(previous, "_tempesta_ts", False):
        return
    try:
        saved = [os.dup(2)]
    except OSError:
        saved = [None]

    def close() -> None:
        fd, saved[0] = saved[0], None
        if fd is not None:
            os.close(fd)

    def hook(kind, value, tb):
        if not isinstance(value, StartupError):
            previous(kind, value, tb)
            return
        line = f"tempesta-ts: {value}\n"
        try:
            if saved[0] is None:
                raise OSError
            os.write(saved[0], line.encode("utf-8", "replace"))
        except OSError:
            sys.stderr.write(line)

    hook._tempesta_ts = True
    sys.excepthook = hook
    reactor.callWhenRunning(close)
