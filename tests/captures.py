"""Real netconsole captures (tests/data/netconsole/): every datagram a Linux kernel sent.

Each file holds one datagram a line as a Python bytes literal; see that folder's README.
"""

from __future__ import annotations

import ast
import os
import re

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "netconsole")

PLAIN_CAPTURES = ("plain-boot-and-warning.txt", "plain-sysrq-crash.txt")
EXTENDED_CAPTURES = (
    "extended-boot-and-warning.txt",
    "extended-fragmented.txt",
    "extended-sysrq-crash.txt",
)


def datagrams(name: str) -> list[bytes]:
    """The datagrams of a capture, in the order they arrived."""
    with open(os.path.join(DATA, name), encoding="ascii") as f:
        return [ast.literal_eval(line) for line in f if line.strip()]


def expected_lines(name: str) -> list[str]:
    """The kernel's log lines in a capture, worked out independently of the decoder.

    Plain: every newline-terminated line without its ``[seconds]`` prefix. Extended: the text
    of each message (fragments joined in order), without header and dictionary.
    """
    grams = datagrams(name)
    if name.startswith("plain"):
        text = b"".join(grams).decode()
        return [re.sub(r"^\[\s*\d+\.\d{6}\] ", "", line) for line in text.split("\n") if line]
    out, pending = [], b""
    for gram in grams:
        header, _, body = gram.partition(b";")
        if b"ncfrag=" in header:
            pending += body
            if not pending.endswith(b"\n") and b"\n" not in pending:
                continue
            body, pending = pending, b""
        text = body.split(b"\n")[0].decode()
        out.append(re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), text))
    return out
