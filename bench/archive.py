"""The archive's cost: CPU per datagram with the archive off and on, and a restore's time.

The hot path of bench/hotpath.py (datagramsReceived called directly, wired as the service
does), at a simulated steady rate: each simulated second the clock moves on and the archive
writes what came, to a real directory (its flush, rotations and compression all run), so the
figure holds the archive's whole work, not only the path of a datagram. Then a restart: the
buffers rebuilt from the files just written. With --instructions, valgrind counts the
instructions instead (CPU time on a shared machine moves by a fifth from run to run).

    python bench/archive.py [--datagrams 500000] [--rate 50000] [--instances 1,100,10000]
        [--max-bytes 67108864] [--dir /var/tmp] [--instructions] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from hotpath import gram  # noqa: E402
from twisted.internet import task  # noqa: E402

from tempesta_ts.access import SourceFilter  # noqa: E402
from tempesta_ts.archive import Archive  # noqa: E402
from tempesta_ts.archive_files import descriptor_budget  # noqa: E402
from tempesta_ts.buffers import BufferRegistry  # noqa: E402
from tempesta_ts.incidents import Rules  # noqa: E402
from tempesta_ts.intake import Intake  # noqa: E402
from tempesta_ts.metrics import KNOWN_STATS  # noqa: E402
from tempesta_ts.tracker import IncidentTracker  # noqa: E402
from tempesta_ts.udp import NetconsoleProtocol  # noqa: E402


def server(instances: int, directory: str | None, max_bytes: int):
    """The registry, tracker and (when directory is given) archive, wired as the service does."""
    stats = dict.fromkeys(KNOWN_STATS, 0)
    clock = task.Clock()
    clock.advance(1_800_000_000)
    registry = BufferRegistry(instances + 10, 1000, 2 * 1024 * 1024, stats,
                              keep_unwritten=directory is not None)
    rules = Rules()
    tracker = IncidentTracker(rules, clock, 5.0, 300.0, None, None, Counter())
    registry.line_filter = rules.line_filter
    archive = None
    if directory is not None:
        archive = Archive(directory, registry, clock, stats, max_bytes, 5, 1 << 40,
                          max_open=descriptor_budget(instances + 16))
    registry.observers.append(tracker.lines_added)
    if archive is not None:
        archive.startService()
    return NetconsoleProtocol(Intake(registry, clock, SourceFilter(()), stats)), clock, archive, stats


def datagrams(count: int, instances: int) -> list:
    return [
        (gram("extended", i // instances, i),
         (f"127.1.{(i % instances) // 250}.{(i % instances) % 250 + 1}", 6666))
        for i in range(count)
    ]


def feed(proto, clock, grams: list, batch: int, rate: int) -> None:
    """The datagrams in reads of `batch`, the clock a second on each `rate` of them."""
    received = proto.datagramsReceived
    per_second = max(1, rate // batch)
    for k, start in enumerate(range(0, len(grams), batch), 1):
        received(grams[start : start + batch])
        if k % per_second == 0:
            # A simulated second: the archive's flush, rotations, compression steps.
            clock.advance(1.0)
    clock.advance(1.0)


def run(args, instances: int, directory: str | None) -> tuple[float, dict]:
    """CPU time a datagram, µs, and the counters, once every instance has its file."""
    proto, clock, archive, stats = server(instances, directory, args.max_bytes)
    # Each instance's first line makes its file: not what a steady stream costs.
    feed(proto, clock, datagrams(instances, instances), args.batch, args.rate)
    if archive is not None:
        archive.flush()
    grams = datagrams(args.datagrams, instances)
    started = time.process_time()
    feed(proto, clock, grams, args.batch, args.rate)
    if archive is not None:
        archive.stopService()
    return (time.process_time() - started) / args.datagrams * 1e6, stats


def restore(directory: str, instances: int) -> tuple[float, int]:
    """Seconds to rebuild the buffers from the archive, and the lines restored."""
    stats = dict.fromkeys(KNOWN_STATS, 0)
    registry = BufferRegistry(instances + 10, 1000, 2 * 1024 * 1024, stats, keep_unwritten=True)
    archive = Archive(directory, registry, task.Clock(), stats, 1 << 26, 5, 1 << 40)
    started = time.process_time()
    archive.files.prepare()
    lines = archive.restore()
    return time.process_time() - started, lines


def counted(*argv: str) -> int:
    """Instructions valgrind counts for this script run with `argv`."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--run", json.dumps(argv)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), timeout=1200,
        check=True,
    ).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def counted_run(what: list) -> None:
    """Under valgrind: make the datagrams, and feed them when asked (with the archive on)."""
    count, instances, mode, max_bytes = int(what[0]), int(what[1]), what[2], int(what[3])
    base = tempfile.mkdtemp(prefix="archive-bench-")
    try:
        directory = os.path.join(base, "archive") if mode == "on" else None
        proto, clock, archive, _ = server(instances, directory, max_bytes)
        if mode != "none":
            feed(proto, clock, datagrams(instances, instances), 64, 50_000)
        grams = datagrams(count, instances)
        if mode != "none":
            feed(proto, clock, grams, 64, 50_000)
        if archive is not None:
            archive.stopService()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def instructions(args) -> None:
    small = args.datagrams // 2
    large = small * 3
    print("instructions a datagram (valgrind; the kernel's not counted):")
    for instances in [int(i) for i in args.instances.split(",")]:
        figures = {}
        for mode in ("none", "off", "on"):
            runs = [counted(str(n), str(instances), mode, str(args.max_bytes)) for n in (small, large)]
            figures[mode] = (runs[1] - runs[0]) / (large - small)
        off = figures["off"] - figures["none"]
        on = figures["on"] - figures["none"]
        print(f"{instances:6} instances: off {off:7.0f}, on {on:7.0f} (+{(on - off) / off * 100:3.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datagrams", type=int, default=500_000)
    parser.add_argument("--rate", type=int, default=50_000, help="datagrams a simulated second")
    parser.add_argument("--instances", default="1,100,10000")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024,
                        help="archive_max_bytes (smaller: more rotations and compression)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp directory)")
    parser.add_argument("--instructions", action="store_true", help="count with valgrind")
    parser.add_argument("--profile", action="store_true", help="cProfile the archive's last case")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        counted_run(json.loads(args.run))
        return
    if args.instructions:
        instructions(args)
        return
    base = tempfile.mkdtemp(prefix="archive-bench-", dir=args.dir)
    try:
        for instances in [int(i) for i in args.instances.split(",")]:
            off, _ = run(args, instances, None)
            directory = os.path.join(base, str(instances))
            on, stats = run(args, instances, directory)
            seconds, lines = restore(directory, instances)
            print(
                f"{instances:6} instances: off {off:5.2f} us, on {on:5.2f} us a datagram "
                f"(+{(on - off) / off * 100:3.0f} %); {stats['archive_lines']} lines written, "
                f"{stats['archive_lines_dropped']} dropped, {stats['archive_rotations']} "
                f"rotations; restore {lines} lines in {seconds:.2f} s"
            )
            shutil.rmtree(directory)
        if args.profile:
            directory = os.path.join(base, "profile")
            profile = cProfile.Profile()
            profile.runcall(run, args, instances, directory)
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
