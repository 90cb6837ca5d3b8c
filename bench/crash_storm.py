"""Crash storm: many instances send a real kernel panic at once to a slow Support Server.

Starts a local HTTPS Support Server (a private CA made here) that answers every report after
--delay seconds, starts the real server under twistd pointed at it, and sends the panic part of
a real extended netconsole capture from --instances source addresses in 127.0.0.0/8. Prints
when the last report arrived, incident-to-delivery latency percentiles, and whether every report
came with the whole trace.

    python bench/crash_storm.py [--instances 1000] [--delay 0.2] [--settle 5]

Bounded: it gives up --settle + --deadline seconds after the last datagram was sent.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from ingest import free_port, machine  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web import resource, server  # noqa: E402

from tests.captures import datagrams  # noqa: E402
from tests.https_server import TrackingSite, listen, make_certificates  # noqa: E402

CAPTURE = "extended-sysrq-crash.txt"
FIRST_INCIDENT = b"sysrq: Trigger a crash"


class SlowSupport(resource.Resource):
    """Answers each report after a delay; records when it came and what it held."""

    isLeaf = True

    def __init__(self, reactor, delay: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.delay = delay
        self.arrivals: dict[str, tuple[float, list[str]]] = {}

    def render_POST(self, request):
        import gzip

        raw = request.content.read()
        if request.getHeader(b"content-encoding") == b"gzip":
            raw = gzip.decompress(raw)
        body = json.loads(raw)
        address = body["instance"]["address"]
        self.arrivals.setdefault(address, (time.time(), [e["text"] for e in body["log"]]))

        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer():
            if gone:
                return
            request.setResponseCode(200)
            request.write(b'{"status": "accepted"}')
            request.finish()

        self.reactor.callLater(self.delay, answer)
        return server.NOT_DONE_YET


def source(i: int) -> str:
    return f"127.{2 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


@defer.inlineCallbacks
def run(reactor, args):
    print(machine())
    tmp = tempfile.mkdtemp()
    certs = make_certificates(os.path.join(tmp, "certs"))
    support = SlowSupport(reactor, args.delay)
    site = TrackingSite(support)
    https = listen(reactor, site, certs)
    port = free_port()
    config = {
        "host": "127.0.0.1", "port": port, "log_level": "warn", "metrics_port": 0,
        "spool_dir": os.path.join(tmp, "spool"), "settle_seconds": args.settle,
        "max_instances": args.instances + 100, "support_host": "127.0.0.1",
        "support_port": https.getHost().port, "support_client_id": "bench",
        "support_api_key": "bench-key", "support_ca_file": certs.ca_file,
    }
    path = os.path.join(tmp, "storm.conf")
    with open(path, "w") as f:
        json.dump(config, f)
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "tempesta-ts", "--config", path],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        deadline = time.time() + 30
        while "listening on UDP and TCP" not in open(log.name).read():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start:\n" + open(log.name).read())
            yield task.deferLater(reactor, 0.1, lambda: None)
        grams = datagrams(CAPTURE)
        start = next(i for i, g in enumerate(grams) if FIRST_INCIDENT in g)
        trace = grams[start:]
        expected = [g.partition(b";")[2].split(b"\n")[0].decode() for g in trace]
        sockets = []
        for i in range(args.instances):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((source(i), 0))
            sockets.append(s)
        # Every instance sends its trace line by line, all instances interleaved, paced.
        incident_at: dict[str, float] = {}
        sent, began = 0, time.time()
        per_tick = max(1, args.rate // 100)
        for line_no, gram in enumerate(trace):
            for i, s in enumerate(sockets):
                s.sendto(gram, ("127.0.0.1", port))
                if line_no == 0:
                    incident_at[source(i)] = time.time()
                sent += 1
                if sent % per_tick == 0:
                    yield task.deferLater(reactor, 0.01, lambda: None)
        last_sent = time.time()
        print(f"sent {sent} datagrams ({len(trace)} lines x {args.instances} instances) in "
              f"{last_sent - began:.1f} s")
        while len(support.arrivals) < args.instances and time.time() < last_sent + args.settle + args.deadline:
            yield task.deferLater(reactor, 0.2, lambda: None)
        arrived = support.arrivals
        latencies = sorted(arrived[a][0] - incident_at[a] for a in arrived)
        whole = sum(1 for a in arrived if arrived[a][1][-len(expected):] == expected)
        if latencies:
            last = max(t for t, _ in arrived.values())
            pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
            print(f"reports arrived: {len(arrived)} of {args.instances}, {whole} with the whole trace")
            print(f"last report {last - last_sent:.1f} s after the last datagram "
                  f"(settle {args.settle} s, Support Server {args.delay * 1000:.0f} ms a request)")
            print(f"incident to delivery: p50 {pct(0.5):.1f} s, p90 {pct(0.9):.1f} s, "
                  f"p99 {pct(0.99):.1f} s, max {latencies[-1]:.1f} s")
        else:
            print("no report arrived; server log:\n" + open(log.name).read()[-3000:])
        for s in sockets:
            s.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        yield https.stopListening()
        for channel in list(site.open_channels):
            channel.transport.abortConnection()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=20_000, help="datagrams a second, all sources")
    parser.add_argument("--deadline", type=float, default=120.0)
    args = parser.parse_args()
    task.react(run, (args,))


if __name__ == "__main__":
    main()
