"""Memory benchmark: resident memory against the bytes of log text held, and the bounds.

Starts the real server under twistd, fills the buffers of --instances instances (each up to
buffer_max_lines lines of about 120 bytes), and reports the server's resident memory against
the log text it holds. Then floods it with many more new source addresses and with first
fragments that never complete, and shows that max_instances and the reassembly bounds hold
memory where it was.

    python bench/memory.py [--instances 10000] [--lines 200] [--archive on|off]

With the archive on (the default), the lines it holds back from their files (up to 10 s of
them with many instances, 64 MiB at most) are in the figures too.

Bounded: each phase sends for a fixed time; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ingest import Server, build_sender, free_port, machine  # noqa: E402

MiB = 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def status(server: Server) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/status.json", timeout=60) as r:
        return json.load(r)


def held(server: Server) -> tuple[int, int, int]:
    """Instances, lines and bytes of log text the server holds."""
    s = status(server)
    return len(s["instances"]), sum(i["lines"] for i in s["instances"]), sum(
        i["bytes"] for i in s["instances"]
    )


def send(sender: str, port: int, rate: int, seconds: float, sources: int, *extra: str) -> int:
    out = subprocess.run(
        [sender, str(port), str(rate), str(seconds), str(sources), *extra],
        check=True, capture_output=True, text=True, timeout=seconds + 120,
    ).stdout
    time.sleep(2.0)
    return int(out.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=200, help="buffer_max_lines")
    parser.add_argument("--rate", type=int, default=60_000)
    parser.add_argument("--archive", choices=("on", "off"), default="on",
                        help="the archive (archive_dir) as by default, or turned off")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        sender = build_sender(tmp)
        archive = {} if args.archive == "on" else {"archive_dir": ""}
        server = Server(tmp, max_instances=args.instances, buffer_max_lines=args.lines, **archive)
        port = free_port()
        server.start(port, args.instances)
        try:
            base = rss(server.proc.pid)
            print(f"started: resident {base / MiB:.1f} MiB")
            total = args.instances * (args.lines + 10)
            seconds = total / args.rate
            sent = send(sender, port, args.rate, seconds, args.instances)
            instances, lines, text = held(server)
            full = rss(server.proc.pid)
            print(f"filled: sent {sent} datagrams; holds {instances} instances, {lines} lines, "
                  f"{text / MiB:.1f} MiB of log text; resident {full / MiB:.1f} MiB = "
                  f"{(full - base) / max(text, 1):.2f} x the text + {base / MiB:.1f} MiB base")
            # New addresses in rounds: a process may hold only so many sockets here.
            flood, per_round = 0, 15_000
            for first in range(args.instances, args.instances * 4, per_round):
                send(sender, port, args.rate, per_round * 5 / args.rate, per_round, "lines", str(first))
                flood += per_round
            instances, lines, text = held(server)
            after = rss(server.proc.pid)
            print(f"after {flood} new sources: {instances} instances, {lines} lines, "
                  f"{text / MiB:.1f} MiB of text; resident {after / MiB:.1f} MiB")
            send(sender, port, args.rate, 5.0, args.instances, "fragments")
            s = status(server)
            after_fragments = rss(server.proc.pid)
            print(f"after 5 s of first fragments that never complete: resident "
                  f"{after_fragments / MiB:.1f} MiB; malformed "
                  f"{s['counters'].get('malformed_datagrams', 0)}, fragments received "
                  f"{s['counters'].get('fragments_received', 0)}, expired or pushed out "
                  f"{s['counters'].get('fragments_expired', 0)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
