"""The files the server reads back and the directories it keeps them in: no symbolic link is
followed, and only the server's user may write the directories (anyone else who could would
choose what is sent to the Support Server, or what a write lands on)."""

from __future__ import annotations

import errno
import os
import pwd
import shlex
import stat

from tempesta_ts.errors import StartupError

# O_NONBLOCK: a FIFO planted in place of a file must not hang the open.
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class NotRegularFile(OSError):
    """A file the server would read is a symbolic link, a FIFO, a device...: it is not read."""


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A descriptor of path, a regular file, never through a symbolic link. Raises OSError,
    NotRegularFile when path is a symbolic link or not a regular file."""
    try:
        fd = os.open(path, flags | _NO_FOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symbolic link, not a regular file", path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file", path)
    return fd


def read_regular(path: str) -> bytes:
    """The whole content of a regular file, never through a symbolic link. Raises OSError."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def check_private_directory(path: str, setting: str) -> None:
    """StartupError, one line with the fix, unless path is a directory of the server's user (or
    root) that neither its group nor others can write."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise StartupError(
            f"{setting}: cannot use {path!r} ({e.strerror}); "
            "expected a directory the server's user can write"
        ) from None
    quoted = shlex.quote(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{setting}: {path!r} is not a directory")
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise StartupError(
            f"{setting}: {path!r} belongs to user {_user(st.st_uid)}, not to the server's user "
            f"{_user(me)}, who could plant files in it; expected a directory of the server's "
            f"user: chown {me} {quoted}, or choose another {setting}"
        )
    writable = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                if st.st_mode & bit]
    if writable:
        raise StartupError(
            f"{setting}: {path!r} is writable by {' and '.join(writable)} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), who could plant or replace the files the server "
            f"reads back; expected only the server's user to write it: chmod go-w {quoted}"
        )
