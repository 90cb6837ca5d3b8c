"""Instructions a datagram on the hot path, counted by valgrind: a figure that does not move
with the machine's load, unlike CPU time on a shared virtual machine.

Two parts, each as the difference between runs that do and do not do the work, at two sizes
(so that start-up cancels out):
- processing: the service's UDP protocol fed batches of 50 datagrams from 100 instances
  whose buffers are full (buffer_max_lines 100), extended and plain format;
- reading: 64 queued datagrams read with recvmmsg (recvmmsg.BatchReader) or with recvfrom,
  against recv into a 4-byte buffer. Instructions in the kernel are not counted.

    python bench/instructions.py [--datagrams 40000]

Needs valgrind (Debian: valgrind). Bounded: eight to twelve runs of a few seconds each under
valgrind; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from hotpath import LINES, gram  # noqa: E402  (what bench/sender.c sends)


def process(count: int, work: bool, fmt: str) -> None:
    """Feed `count` datagrams to the service's protocol; with work=False only make them."""
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor

    from tempesta_ts.config import Config
    from tempesta_ts.service import TroubleshootingService

    spool = tempfile.mkdtemp()
    config = Config(host="127.0.0.1", port=0, log_level="warn", spool_dir=spool,
                    max_instances=1000, buffer_max_lines=100, metrics_port=0)
    received = TroubleshootingService(config, reactor).udp.datagramsReceived
    sources = [(f"127.1.0.{i + 1}", 6666) for i in range(100)]
    for start in range(0, count, 50):
        batch = [(gram(fmt, i // 100, i), sources[i % 100]) for i in range(start, start + 50)]
        if work:
            received(batch)
    shutil.rmtree(spool, ignore_errors=True)


def read(count: int, how: str) -> None:
    """Queue datagrams 64 at a time and read them with `how` (recvmmsg, recvfrom, recv4)."""
    sys.path.insert(0, ROOT)
    from tempesta_ts.recvmmsg import BatchReader

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    datagram = b"6,12345,123456789,-;" + LINES[0] + b"\n"
    reader, out = BatchReader(receiver), []
    for _ in range(count // 64):
        for i in range(64):
            senders[i % 8].sendto(datagram, receiver.getsockname())
        if how == "recvmmsg":
            out.clear()
            reader.read(out.append)
        elif how == "recvfrom":
            for _ in range(64):
                receiver.recvfrom(65535)
        else:
            for _ in range(64):
                receiver.recv(4)


def counted(*args: str) -> int:
    """Instructions valgrind counts for this script run with `args`."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--run", json.dumps(args)],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    ).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def per_datagram(small: int, large: int, work: tuple, baseline: tuple) -> int:
    with_work = counted(str(large), *work) - counted(str(small), *work)
    without = counted(str(large), *baseline) - counted(str(small), *baseline)
    return round((with_work - without) / (large - small))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datagrams", type=int, default=40_000)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        what = json.loads(args.run)
        count = int(what[0])
        if what[1] == "process":
            process(count, what[2] == "work", what[3])
        else:
            read(count, what[2])
        return
    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind (Debian: apt-get install valgrind)")
    small, large = args.datagrams // 2, args.datagrams * 3 // 2
    small, large = small - small % 64, large - large % 64
    print("instructions a datagram, in process (valgrind; the kernel's not counted):")
    for fmt in ("extended", "plain"):
        n = per_datagram(small, large, ("process", "work", fmt), ("process", "none", fmt))
        print(f"  processing, {fmt:8} format: {n:6}")
    for how in ("recvmmsg", "recvfrom"):
        n = per_datagram(small, large, ("read", how), ("read", "recv4"))
        print(f"  reading with {how:8} (beyond recv into 4 bytes): {n:6}")


if __name__ == "__main__":
    main()
