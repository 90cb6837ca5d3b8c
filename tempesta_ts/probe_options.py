"""tempesta-ts-probe's command line: the options, each checked with an error that names it."""

from __future__ import annotations

import ipaddress
import sys
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.python import usage

from tempesta_ts import __version__

PROG = "tempesta-ts-probe"
#: The server's default metrics_host:metrics_port.
DEFAULT_STATUS_URL = "http://127.0.0.1:9478/status.json"
DEFAULT_PORT = 5555
DEFAULT_TIMEOUT = 30.0
#: The server's default settle_seconds: a report waits that long before it is sent.
DEFAULT_SETTLE = 5.0


def ip_address(value: str) -> str:
    """An IPv4 or IPv6 address, as netconsole needs one."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address; give the address the instances' netconsole "
            "sends to (netconsole takes no host names)"
        ) from None


ip_address.coerceDoc = "An IPv4 or IPv6 address."


def _bounded(convert, lo: float, hi: float, noun: str, bounds: str, doc: str, low_open=False):
    """A coerce function: a number `convert` parses, from lo to hi (lo excluded if low_open)."""

    def coerce(value: str):
        try:
            number = convert(value)
        except ValueError:
            raise ValueError(f"{value!r} is not {noun}") from None
        if not (lo < number if low_open else lo <= number) or number > hi:
            raise ValueError(f"{value} {bounds}")
        return number

    coerce.coerceDoc = doc
    return coerce


port_number = _bounded(int, 1, 65535, "a port number", "is not a port number (1 to 65535)",
                       "1 to 65535.")
seconds = _bounded(float, 0, 86400, "a number of seconds", "is not between 0 and 86400 seconds",
                   "Seconds, more than 0.", low_open=True)
#: Like the server's settle_seconds.
settle_seconds = _bounded(float, 0, 3600, "a number of seconds",
                          "is not between 0 and 3600 seconds", "Seconds, 0 to 3600.")


def http_url(value: str) -> str:
    """An http:// or https:// URL with a host."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{value!r} is not an http:// URL; give the server's metrics_host:metrics_port, "
            f"e.g. {DEFAULT_STATUS_URL}"
        )
    return value


http_url.coerceDoc = "An http:// URL."


def _flag(name: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    """A coerce function whose error names the flag (usage.Options would say less)."""

    def flag(value: str):
        try:
            return coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None

    flag.coerceDoc = coerce.coerceDoc
    return flag


class Options(usage.Options):
    """The probe's command line."""

    optParameters = [
        ["host", None, None, "IP address of the server, as the instances send to it",
         _flag("host", ip_address)],
        ["port", None, DEFAULT_PORT, "Port of the server, UDP and TCP (its --port).",
         _flag("port", port_number)],
        ["status-url", None, DEFAULT_STATUS_URL,
         "The server's /status.json (its metrics_host:metrics_port).",
         _flag("status-url", http_url)],
        ["timeout", None, DEFAULT_TIMEOUT, "Seconds to wait for each step to be confirmed.",
         _flag("timeout", seconds)],
        ["settle", None, DEFAULT_SETTLE,
         "The server's settle_seconds, added to the wait for a report.",
         _flag("settle", settle_seconds)],
    ]
    optFlags = [
        ["incident", None, "Also send a test WARNING and follow its report to the end."],
        ["plain-only", None, "Send only the plain netconsole datagram."],
        ["extended-only", None, "Send only the extended netconsole datagram."],
    ]

    def __init__(self, prog: str = PROG) -> None:
        super().__init__()
        self.prog = prog
        self.synopsis = f"Usage: {prog} --host ADDRESS [options]"
        self.longdesc = (
            "Sends test netconsole datagrams and a system information document to a tempesta-ts "
            "server from this machine and confirms through its /status.json that they arrived; "
            "with --incident also follows a test WARNING's report. Exit status: 0 all worked, "
            "1 something failed (the reason is printed), 2 usage error. See docs/probe.md."
        )

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"{self.prog} (tempesta-ts) {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["host"] is None:
            raise usage.UsageError(
                "--host is required: the IP address of the server, as the instances' "
                "netconsole sends to it"
            )
        if self["plain-only"] and self["extended-only"]:
            raise usage.UsageError("--plain-only and --extended-only exclude each other")
