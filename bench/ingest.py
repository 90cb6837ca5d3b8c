"""Ingest benchmark: the highest zero-loss rate of netconsole datagrams, and CPU per datagram.

Starts the real server under twistd on loopback, drives it with bench/sender.c (sendmmsg, built
here with cc), and does the same for a bare Python recvfrom loop (bench/bare_receiver.py), the
ceiling for any Python receiver on this machine. Prints the figures and the machine.

    python bench/ingest.py [--seconds 3] [--instances 1,100,10000] [--format extended|plain]
        [--archive on|off|both] [--cpu-only] [--cpu-instances 100] [--dir /dev/shm]

Every run is bounded: each trial lasts --seconds, the search takes at most --steps trials per
case, and every child process is killed at the end. Traffic goes to 127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RCVBUF = 8 * 1024 * 1024
SENDER_CEILING = 400_000


@dataclass
class Trial:
    rate: int
    sources: int
    sent: int
    received: int
    lines: int
    rcvbuf_errors: int
    cpu_seconds: float

    @property
    def lossless(self) -> bool:
        return self.received == self.sent and self.rcvbuf_errors == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t.bind(("127.0.0.1", port))
        return port


def udp_rcvbuf_errors() -> int:
    """The kernel's count of datagrams dropped for a full socket buffer, host-wide."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_sender(directory: str) -> str:
    binary = os.path.join(directory, "sender")
    subprocess.run(
        ["cc", "-O2", "-o", binary, os.path.join(HERE, "sender.c")], check=True, timeout=60
    )
    # 10,000 sockets of the sender need the file limit raised, which root may do.
    return binary


def wait_for_line(proc: subprocess.Popen, needle: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver ended before {needle!r}")
        if needle in line:
            return
    raise RuntimeError(f"no {needle!r} within {seconds} s")


class BareReceiver:
    """python bench/bare_receiver.py: counts datagrams, nothing more."""

    name = "bare recvfrom loop"

    def start(self, port: int, sources: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "bare_receiver.py"), str(port), str(RCVBUF)],
            stdout=subprocess.PIPE, text=True,
        )
        wait_for_line(self.proc, "ready", 10)

    def counts(self) -> tuple[int, int]:
        return self._final, self._final

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        self._final = int(out.split()[-1])


class Server:
    """The real server: twistd tempesta-ts, counters read from /status.json.

    With processes > 1, that many servers share the port (reuse_port), each with its own spool
    and metrics port; their counters and CPU time are summed.
    """

    def __init__(self, spool: str, processes: int = 1, **settings) -> None:
        self.spool = spool
        self.processes = processes
        self.settings = settings
        self.name = "tempesta-ts" if processes == 1 else f"tempesta-ts x{processes}"
        if settings.get("archive_dir") == "":
            self.name += " (no archive)"

    def start(self, port: int, sources: int) -> None:
        self.children = []
        for n in range(self.processes):
            self.children.append(self._start_one(port, sources, n))
        # The first process, for what looks at one (its pid, its metrics port).
        self.proc, self.metrics = self.children[0]

    def _start_one(self, port: int, sources: int, n: int):
        metrics = free_port()
        spool = os.path.join(self.spool, f"spool-{n}")
        config = {
            "host": "127.0.0.1", "port": port, "log_level": "warn", "spool_dir": spool,
            "max_instances": max(1000, sources + 10), "buffer_max_lines": 1000,
            "metrics_host": "127.0.0.1", "metrics_port": metrics,
            "udp_receive_buffer_bytes": RCVBUF, **self.settings,
        }
        if self.processes > 1:
            config.update(reuse_port=True, system_info_dir=os.path.join(self.spool, "system-info"))
        path = os.path.join(self.spool, f"bench-{n}.conf")
        with open(path, "w") as f:
            json.dump(config, f)
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        # Output to a file: a pipe nobody reads could fill up and stall the server.
        log_path = os.path.join(self.spool, f"server-{n}.log")
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "tempesta-ts", "--config", path],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + 30
        while "listening on UDP and TCP" not in open(log_path).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + open(log_path).read())
            time.sleep(0.1)
        self.log_path = log_path
        return proc, metrics

    def cpu(self) -> float:
        return sum(cpu_seconds(proc.pid) for proc, _ in self.children)

    def counts(self) -> tuple[int, int]:
        return self.counter("datagrams"), self.counter("lines")

    def wait_for_archive(self, lines: int, seconds: float) -> None:
        """Until the archive wrote `lines` (each new instance's file made), or `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.settings.get("archive_dir") == "":
                return
            # (Within a hundredth: a datagram of the warm-up may be lost.)
            if self.counter("archive_lines") >= lines * 0.99:
                return

    def counter(self, name: str) -> int:
        total = 0
        for _, metrics in self.children:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/status.json", timeout=10) as r:
                total += json.load(r)["counters"].get(name, 0)
        return total

    def stop(self) -> None:
        for proc, _ in self.children:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in self.children:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_trial(receiver, sender: str, rate: int, seconds: float, sources: int,
              fmt: str = "extended", warm: bool = False) -> Trial:
    port = free_port()
    receiver.start(port, sources)
    try:
        if warm:
            # A datagram from each source first, and time for the archive to make each one's
            # file: a steady stream's cost, not that of 10,000 new instances.
            subprocess.run([sender, str(port), str(sources), "1", str(sources),
                            "plain" if fmt == "plain" else "lines"],
                           check=True, capture_output=True, timeout=120)
            receiver.wait_for_archive(sources, 120.0)
            # The last files' making (a few, after the lines counted) out of the figure.
            time.sleep(2.0)
        before = receiver.counts() if isinstance(receiver, Server) else (0, 0)
        errors = udp_rcvbuf_errors()
        cpu_of = getattr(receiver, "cpu", lambda: cpu_seconds(receiver.proc.pid))
        cpu = cpu_of()
        out = subprocess.run(
            [sender, str(port), str(rate), str(seconds), str(sources),
             "plain" if fmt == "plain" else "lines"],
            check=True, capture_output=True, text=True, timeout=seconds + 120,
        ).stdout
        sent = int(out.split()[1])
        # Let the receiver drain its socket buffer.
        time.sleep(1.0 + seconds * 0.2)
        used = cpu_of() - cpu
        errors = udp_rcvbuf_errors() - errors
        if isinstance(receiver, Server):
            received, lines = receiver.counts()
            received, lines = received - before[0], lines - before[1]
    finally:
        receiver.stop()
    if not isinstance(receiver, Server):
        received, lines = receiver.counts()
    return Trial(rate, sources, sent, received, lines, errors, used)


def highest_lossless_rate(receiver, sender, seconds, sources, start, steps,
                          fmt="extended") -> tuple[int, list]:
    """Double the rate until a trial loses, then bisect; the best lossless rate seen."""
    trials, good, bad, rate = [], 0, None, start
    for _ in range(steps):
        t = run_trial(receiver, sender, rate, seconds, sources, fmt)
        trials.append(t)
        print(f"    {receiver.name:20} {sources:6} sources  {rate:8}/s asked  "
              f"{t.sent / seconds:9.0f}/s sent  lost {t.sent - t.received:7}  "
              f"rcvbuf errors {t.rcvbuf_errors:7}  cpu {t.cpu_seconds:.2f} s", flush=True)
        achieved = int(t.sent / seconds)
        if t.lossless:
            good = max(good, achieved)
            if achieved < rate * 0.95:  # the sender itself can go no faster
                break
        else:
            bad = rate if bad is None else min(bad, rate)
        if bad is None:
            rate = min(rate * 2, SENDER_CEILING)
        else:
            if bad - max(good, 1) < bad * 0.05:
                break
            rate = (max(good, 1) + bad) // 2
    return good, trials


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rmem = open("/proc/sys/net/core/rmem_max").read().strip()
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, net.core.rmem_max={rmem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--instances", default="1,100,10000")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cpu-rate", type=int, default=50_000)
    parser.add_argument("--cpu-instances", type=int, default=100,
                        help="source addresses of the CPU trials")
    parser.add_argument("--cpu-pairs", type=int, default=3,
                        help="pairs of CPU trials (bare loop, then tempesta-ts): a shared virtual "
                             "machine's CPU time moves by a fifth from one trial to the next")
    parser.add_argument("--processes", type=int, default=1,
                        help="also measure this many server processes sharing the port (reuse_port)")
    parser.add_argument("--format", choices=("extended", "plain"), default="extended",
                        help="netconsole's extended format (+) or plain lines")
    parser.add_argument("--archive", choices=("on", "off", "both"), default="on",
                        help="the archive of every line (archive_dir) on, as by default, off, or "
                             "both one after the other")
    parser.add_argument("--cpu-only", action="store_true", help="skip the zero-loss search")
    parser.add_argument("--dir", default=None,
                        help="where the servers keep their files (default: the temporary "
                             "directory); /dev/shm gives steadier CPU figures, see "
                             "docs/performance.md")
    args = parser.parse_args()
    if shutil.which("cc") is None:
        sys.exit("needs a C compiler (cc) to build the sender")
    print(machine())
    print(f"{args.format} format")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sender = build_sender(tmp)
        results = {}
        archives = {"on": [{}], "off": [{"archive_dir": ""}], "both": [{}, {"archive_dir": ""}]}
        servers = archives[args.archive]
        for sources in [] if args.cpu_only else [int(n) for n in args.instances.split(",")]:
            receivers = [BareReceiver(), *(Server(tmp, **settings) for settings in servers)]
            if args.processes > 1:
                receivers.append(Server(tmp, args.processes))
            for receiver in receivers:
                best, _ = highest_lossless_rate(
                    receiver, sender, args.seconds, sources, 25_000, args.steps, args.format)
                results[(receiver.name, sources)] = best
        print("\nhighest zero-loss rate (datagrams/s):")
        for sources in [] if args.cpu_only else [int(n) for n in args.instances.split(",")]:
            bare = results[("bare recvfrom loop", sources)]
            for name, ours in results.items():
                if name[1] == sources and name[0] != "bare recvfrom loop":
                    share = f"{100 * ours / bare:.0f}%" if bare else "-"
                    print(f"  {sources:6} instances: bare {bare:8}  {name[0]} {ours:8}  ({share} of bare)")
        print(f"\nCPU per datagram at {args.cpu_rate}/s from {args.cpu_instances} instances, "
              f"{args.seconds * 2:.0f} s "
              f"a trial, {args.cpu_pairs} pairs of trials back to back:")
        ratios: dict[str, list[float]] = {}
        for _ in range(args.cpu_pairs):
            pair = []
            for receiver in (BareReceiver(), *(Server(tmp, **settings) for settings in servers)):
                t = run_trial(receiver, sender, args.cpu_rate, args.seconds * 2, args.cpu_instances,
                              args.format, warm=isinstance(receiver, Server))
                pair.append(1e6 * t.cpu_seconds / max(t.received, 1))
                print(f"  {receiver.name:30} {pair[-1]:6.2f} us  (received {t.received} of "
                      f"{t.sent}, {t.lines} lines)", flush=True)
                if len(pair) > 1:
                    ratios.setdefault(receiver.name, []).append(pair[-1] / pair[0])
        for name, values in ratios.items():
            print(f"  {name} / bare loop: {', '.join(f'{r:.2f}' for r in sorted(values))}; "
                  f"median {statistics.median(values):.2f}")


if __name__ == "__main__":
    main()
