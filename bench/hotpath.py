"""The hot path in process: datagramsReceived called directly, CPU time per datagram.

No sockets and no reactor turns: the decoder, the registry, the buffers and the incident
tracker's look at each line, as the service wires them. For profiling changes to the hot path
before measuring them end to end with bench/ingest.py.

    python bench/hotpath.py [--datagrams 200000] [--instances 1,100,10000] [--format plain] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402

from tempesta_ts.access import SourceFilter  # noqa: E402
from tempesta_ts.config import Config  # noqa: E402
from tempesta_ts.intake import Intake  # noqa: E402
from tempesta_ts.metrics import KNOWN_STATS  # noqa: E402
from tempesta_ts.pipeline import build_pipeline  # noqa: E402
from tempesta_ts.udp import NetconsoleProtocol  # noqa: E402

# The ordinary lines bench/sender.c sends, in turn.
LINES = [
    b"tfw_http_msg_process: [tempesta fw] request processed for client 192.0.2.77 status 200",
    b"[tempesta fw] Starting virtual host 'default' listening on 0.0.0.0:443, 64 worker threads",
    b"nf_conntrack: nf_conntrack: table full, dropping packet from 192.0.2.77 to 198.51.100.5",
    b"TCP: request_sock_TCP: Possible SYN flooding on port 443. Sending cookies.  Check SNMP counters.",
]


def gram(fmt: str, seq: int, usec: int) -> bytes:
    """The datagram netconsole sends for the instance's seq-th line, as bench/sender.c does."""
    line = LINES[seq % 4]
    if fmt == "plain":
        return b"[%5d.%06d] %s\n" % (usec // 1_000_000, usec % 1_000_000, line)
    return b"6,%d,%d,-;%s\n" % (seq, usec, line)


def protocol(instances: int) -> NetconsoleProtocol:
    stats = dict.fromkeys(KNOWN_STATS, 0)
    clock = task.Clock()
    config = Config(max_instances=instances + 10, buffer_max_lines=1000,
                    buffer_max_bytes=2 * 1024 * 1024)
    # No incident among these lines: no report is made, no sink needed.
    registry = build_pipeline(config, clock, stats, sinks=()).registry
    return NetconsoleProtocol(Intake(registry, clock, SourceFilter(()), stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datagrams", type=int, default=200_000)
    parser.add_argument("--instances", default="1,100,10000")
    parser.add_argument("--batch", type=int, default=64,
                        help="datagrams a read of the socket finds (about 50 at 50,000/s)")
    parser.add_argument("--format", choices=("extended", "plain"), default="extended")
    parser.add_argument("--profile", action="store_true", help="cProfile the last case")
    args = parser.parse_args()
    n = args.datagrams
    for instances in [int(i) for i in args.instances.split(",")]:
        proto = protocol(instances)
        grams = [
            (gram(args.format, i // instances, i),
             (f"127.1.{(i % instances) // 250}.{(i % instances) % 250 + 1}", 6666))
            for i in range(n)
        ]
        batches = [grams[i : i + args.batch] for i in range(0, n, args.batch)]
        received = proto.datagramsReceived
        started = time.process_time()
        for batch in batches:
            received(batch)
        per = (time.process_time() - started) / n * 1e6
        print(f"{instances:6} instances: {per:5.2f} us a datagram")
    if args.profile:
        received = protocol(instances).datagramsReceived
        profile = cProfile.Profile()
        profile.runcall(lambda: [received(batch) for batch in batches])
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
