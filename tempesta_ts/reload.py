"""Signals an operator sends: SIGHUP reloads the config file (and the API key and CA files),
SIGUSR1 reopens the log file. `diff` (pure) says what a reload may change live and what waits
for a restart; `Signals` installs the handlers while the server runs."""

from __future__ import annotations

import signal
from dataclasses import fields, replace
from typing import Callable, Iterable

from twisted.application import service
from twisted.logger import Logger
from twisted.python.logfile import BaseLogFile

from tempesta_ts.config import Config, ConfigError

#: The keys a reload changes live; any other changed key is named as needing a restart and
#: keeps its running value. A component that takes a key live adds it here and has a
#: ``reconfigure(config)`` the service calls (`TroubleshootingService.reconfigurable`).
RELOADABLE = {
    "allowed_sources",
    "log_level",
    "incident_patterns",
    "ignore_patterns",
    "settle_seconds",
    "cooldown_seconds",
    "support_api_key",
    "support_api_key_file",
    "support_ca_file",
    "skip_ssl_verification",
    "report_redactions",
    "report_exclude_patterns",
    "status_token",
    "status_token_file",
}


def diff(old: Config, new: Config, reloadable: Iterable[str] = RELOADABLE) -> tuple[list[str], list[str]]:
    """(keys changed that apply live, keys changed that need a restart), in the table's order."""
    live, restart = [], []
    reloadable = set(reloadable)
    for f in fields(Config):
        if getattr(old, f.name) != getattr(new, f.name):
            (live if f.name in reloadable else restart).append(f.name)
    return live, restart


def in_force(old: Config, new: Config, live: Iterable[str]) -> Config:
    """The settings after a reload: the new value of each live key, the running one elsewhere."""
    return replace(old, **{key: getattr(new, key) for key in live})


def describe(source: str, live: list[str], restart: list[str], also: Iterable[str] = ()) -> str:
    """The one line a reload logs: what changed, and what needs a restart."""
    changed = [*live, *also]
    parts = [f"Reloaded {source}: " + ("changed " + ", ".join(changed) if changed else "nothing changed")]
    if restart:
        parts.append("needs a restart to change " + ", ".join(restart) + " (running values kept)")
    return "; ".join(parts)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def find_log_file(handler) -> BaseLogFile | None:
    """The log file of twistd's SIGUSR1 handler (it rotates the file given with ``-l``), or
    None when twistd logs to standard output (no handler then)."""
    for cell in getattr(handler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, BaseLogFile):
            return value
    return None


class Signals(service.Service):
    """SIGHUP: reload (`load` gives the new Config, `apply` makes it live, raising ConfigError
    to refuse it); SIGUSR1: reopen the log file. The previous handlers are back at stop."""

    # Unfiltered by log_level: an operator who sent the signal needs the answer.
    log = Logger()

    def __init__(self, reactor, source: str | None, load: Callable[[], Config],
                 current: Callable[[], Config], apply: Callable[[Config], None]) -> None:
        self.reactor = reactor
        self.source = source or "the settings (no config file; flags, key and CA files)"
        self.load = load
        self.current = current
        self.apply = apply
        self._previous: dict[int, object] = {}
        self._log_file: BaseLogFile | None = None
        self._ca = None

    def startService(self) -> None:
        super().startService()
        self._ca = _read(self.current().support_ca_file)
        # twistd rotates its -l file on SIGUSR1; reopening suits logrotate (which renames).
        self._log_file = find_log_file(signal.getsignal(signal.SIGUSR1))
        for number, then in ((signal.SIGHUP, self.reload), (signal.SIGUSR1, self.reopen)):
            self._previous[number] = signal.signal(number, self._later(then))

    def stopService(self):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        return super().stopService()

    def _later(self, then: Callable[[], None]):
        # A signal handler runs between two bytecodes of whatever runs: the work waits for
        # the reactor's next turn.
        def handler(number, frame) -> None:
            self.reactor.callFromThread(then)

        return handler

    def reload(self) -> None:
        """Read the config again; apply what may change live, or refuse it all with the reason."""
        try:
            old = self.current()
            try:
                new = self.load()
            except ConfigError as e:
                self.log.error("Reload refused, the running settings stay: {reason}", reason=str(e))
                return
            live, restart = diff(old, new)
            ca = _read(new.support_ca_file)
            also = ["support_ca_file (its contents)"] if (
                "support_ca_file" not in live and ca != self._ca
            ) else []
            try:
                self.apply(in_force(old, new, live))
            except ConfigError as e:
                self.log.error("Reload refused, the running settings stay: {reason}", reason=str(e))
                return
            self._ca = ca
            self.log.info(describe(self.source, live, restart, also))
        except Exception:
            self.log.failure("Reload failed; the running settings stay")

    def reopen(self) -> None:
        """Reopen twistd's log file (after logrotate moved it); harmless without one."""
        try:
            if self._log_file is None:
                self.log.info("SIGUSR1: no log file to reopen (logging to standard output)")
                return
            self._log_file.reopen()
            self.log.info("SIGUSR1: reopened the log file {path}", path=self._log_file.path)
        except Exception:
            self.log.failure("SIGUSR1: could not reopen the log file")
