"""The server's loggers, filtered by the configured ``log_level``.

twistd installs the observers that print; the level filter sits in front of the loggers of
this package only, so Twisted's own messages are left as twistd shows them.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

# The process's log level, as logging's root level is: one setting for the whole server.
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def get_logger(namespace: str) -> Logger:
    """A Logger whose events pass the configured level."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the level of this package's messages: debug, info, warn or error."""
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def level() -> LogLevel:
    """The level in force."""
    return _predicate.logLevelForNamespace("")
