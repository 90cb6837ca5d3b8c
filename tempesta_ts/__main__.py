"""``python -m tempesta_ts COMMAND``: the command-line tools beside the twistd plugin."""

from __future__ import annotations

import sys

from tempesta_ts import __version__, probe

#: Command name -> its entry point, which takes (argv, prog).
COMMANDS = {"probe": probe.main}

USAGE = f"""Usage: python -m tempesta_ts COMMAND [options]

Commands:
  probe    check a running server end to end (the console script tempesta-ts-probe)

The server itself runs under twistd: twistd -n --pidfile= tempesta-ts --help
tempesta-ts {__version__}; python -m tempesta_ts COMMAND --help for a command's options.
"""


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a command; exit 2 with the usage for an unknown one."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "a command is needed"
        sys.stderr.write(f"python -m tempesta_ts: {given}\n{USAGE}")
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:], prog=f"python -m tempesta_ts {argv[0]}")


if __name__ == "__main__":
    main()
