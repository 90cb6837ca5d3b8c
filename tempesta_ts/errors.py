"""Errors that stop the server from starting, and the one-line reasons they give."""

import errno
import socket


class StartupError(Exception):
    """The server cannot start; the message says why and what to do, in one line."""


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the value and what is expected."""


def describe_listen_error(
    proto: str,
    host: str,
    port: int,
    error: BaseException,
    *,
    host_flag: str = "--host",
    port_flag: str = "--port",
) -> str:
    """One line that says why a listener could not bind and what to do."""
    code = getattr(error, "errno", None)
    where = f"cannot listen on {proto} {host}:{port}"
    if code == errno.EADDRINUSE:
        return (
            f"{where}: the port is in use by another program; stop it or choose another "
            f"{port_flag}"
        )
    if code == errno.EACCES:
        return (
            f"{where}: permission denied; ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE, or choose a port of 1024 or more"
        )
    if code == errno.EADDRNOTAVAIL:
        return f"{where}: no interface has this address; set {host_flag} to one of this machine's"
    if isinstance(error, socket.gaierror):
        return f"{where}: the host does not resolve; set {host_flag} to an IP address"
    return f"{where}: {error}"
