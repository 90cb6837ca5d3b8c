"""The server's loggers, filtered by the configured ``log_level``.

twistd installs the observers that print; the level filter sits in front of the loggers of
this package only, so Twisted's own messages are left as twistd shows them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import twisted.python.log
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

# What must not reach a terminal or the journal as it came: the backslash (so that an escape
# is unambiguous), C0 and C1 controls and DEL (ESC sequences, CR over-writing a line, NUL),
# bidi marks, embeddings, overrides and isolates (text shown in another order than it is),
# invisible format characters, line and paragraph separators, lone surrogates (which no
# UTF-8 writer takes) and the invisible tag characters.
_UNSAFE = re.compile(
    r"[\\\x00-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    r"\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """Untrusted text (kernel lines, answers, peers' words) made safe for one log line.

    Control, bidi and invisible characters become ``\\x1b``, ``\\r``, ``\\u202e``; a backslash
    becomes two, so what is shown tells exactly what came.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escaped, text)


#: A piece of a secret this long or longer is masked wherever it appears.
SECRET_PIECE = 8
#: A secret's start this long or longer is masked where a text is cut.
SECRET_START_AT_CUT = 4
MASK = "********"


def mask_secret(text: str, secret: str | None, cut: bool = False) -> str:
    """`text` with every piece of `secret` of SECRET_PIECE characters or more masked.

    With `cut` (the text was cut short), also a start of the secret that ends it: the rest of
    the secret may be what was cut off.
    """
    if not secret or len(secret) < SECRET_START_AT_CUT:
        return text
    size = min(SECRET_PIECE, len(secret))
    pieces = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    # A longer piece is a run of overlapping pieces of `size`: marking each finds it whole.
    masked = bytearray(len(text))
    for i in range(len(text) - size + 1):
        if text[i : i + size] in pieces:
            masked[i : i + size] = b"\x01" * size
    if cut:
        for length in range(min(len(secret) - 1, len(text)), SECRET_START_AT_CUT - 1, -1):
            if text.endswith(secret[:length]):
                masked[len(text) - length :] = b"\x01" * length
                break
    if not any(masked):
        return text
    parts = []
    for i, char in enumerate(text):
        if not masked[i]:
            parts.append(char)
        elif i == 0 or not masked[i - 1]:
            parts.append(MASK)
    return "".join(parts)


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


@contextmanager
def quiet_port_notices() -> Iterator[None]:
    """Drop the "X starting on N" line Twisted's TCP and UDP ports log, unconditionally, as
    they bind (the one start-up line says where the server listens); any other line passes."""
    legacy = twisted.python.log
    original = legacy.msg

    def msg(*message, **kw):
        if len(message) == 1 and isinstance(message[0], str) and " starting on " in message[0]:
            return None
        return original(*message, **kw)

    # Scoped to a synchronous bind, in the reactor's thread: nothing else logs meanwhile.
    legacy.msg = msg
    try:
        yield
    finally:
        legacy.msg = original
