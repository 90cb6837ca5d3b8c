"""A real ClickHouse for tests: the installed clickhouse-server (Debian's package) on free
loopback ports, from a copy of its packaged configuration with the paths and ports changed.

One server serves the tests of a class: the first test's setUp starts it, the last test's
cleanup stops it (and an exit handler, when only some tests of the class ran here). trial has no
setUpClass, and a process it watches would be reported as left over after each test: the server
is a plain subprocess, killed with its parent (setpriv --pdeathsig) should the tests be killed.
ClickHouse 18.16 runs as root: the data directory is the tests', owned by whoever runs them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import xml.etree.ElementTree as ET

import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

CONFIG_DIR = "/etc/clickhouse-server"
#: Debian 12 installs the server in /usr/sbin; ClickHouse's own packages in /usr/bin.
BINARIES = ("/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server")
START_SECONDS = 60.0
STOP_SECONDS = 20.0
#: A user with a password, added to the copy of users.xml.
USER = "tempesta"
PASSWORD = "ch-test-password-4217"
#: Paths of the packaged configuration, moved under the test's directory.
PACKAGED_PATHS = ("/var/lib/clickhouse", "/var/log/clickhouse-server")
#: Ports set; any other <..._port> of the packaged file is removed.
PORTS = ("http_port", "tcp_port", "interserver_http_port")


def binary() -> str | None:
    """The clickhouse-server executable, if installed."""
    found = shutil.which("clickhouse-server")
    if found:
        return found
    return next((path for path in BINARIES if os.access(path, os.X_OK)), None)


def unavailable() -> str | None:
    """Why the tests cannot run a ClickHouse here, or None."""
    if binary() is None:
        return "clickhouse-server is not installed (apt-get install clickhouse-server)"
    for name in ("config.xml", "users.xml"):
        if not os.path.isfile(os.path.join(CONFIG_DIR, name)):
            return f"{CONFIG_DIR}/{name} is missing (the clickhouse-server package's)"
    return None


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (held open together, so they differ)."""
    holders = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            holders.append(s)
        return [s.getsockname()[1] for s in holders]
    finally:
        for s in holders:
            s.close()


def write_config(directory: str, ports: dict[str, int]) -> str:
    """The packaged config.xml and users.xml copied into `directory`, paths and ports changed;
    the path of the config."""
    tree = ET.parse(os.path.join(CONFIG_DIR, "config.xml"))
    root = tree.getroot()
    for element in root.iter():
        text = (element.text or "").strip()
        for packaged in PACKAGED_PATHS:
            if text.startswith(packaged):
                element.text = os.path.join(directory, packaged.strip("/").replace("/", "_")) + text[len(packaged):]
    for element in list(root):
        if element.tag.endswith("_port") and element.tag not in PORTS:
            root.remove(element)
        elif element.tag == "listen_host" and (element.text or "").strip() not in ("127.0.0.1", "::1"):
            root.remove(element)
    for tag, port in ports.items():
        element = root.find(tag)
        if element is None:
            element = ET.SubElement(root, tag)
        element.text = str(port)
    if root.find("listen_host") is None:
        ET.SubElement(root, "listen_host").text = "127.0.0.1"
    # A host without IPv6 must not stop the start on ::1.
    try_element = root.find("listen_try")
    if try_element is None:
        try_element = ET.SubElement(root, "listen_try")
    try_element.text = "1"
    logger = root.find("logger")
    if logger is not None and logger.find("level") is not None:
        logger.find("level").text = "warning"
    path = os.path.join(directory, "config.xml")
    tree.write(path)

    users = ET.parse(os.path.join(CONFIG_DIR, "users.xml"))
    listed = users.getroot().find("users")
    user = ET.SubElement(listed, USER)
    ET.SubElement(user, "password").text = PASSWORD
    networks = ET.SubElement(user, "networks")
    ET.SubElement(networks, "ip").text = "127.0.0.1"
    ET.SubElement(networks, "ip").text = "::1"
    ET.SubElement(user, "profile").text = "default"
    ET.SubElement(user, "quota").text = "default"
    users.write(os.path.join(directory, "users.xml"))
    return path


class ClickHouseServer:
    """A clickhouse-server process of the tests' own, and a client to query it."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="tempesta-ts-clickhouse-")
        self.http_port, tcp_port, interserver = free_ports(3)
        self.config = write_config(self.directory, {
            "http_port": self.http_port, "tcp_port": tcp_port, "interserver_http_port": interserver,
        })
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self._pool))

    @defer.inlineCallbacks
    def start(self):
        """Start the server; fires once it answers /ping (bounded by START_SECONDS)."""
        log = open(os.path.join(self.directory, "stdout.log"), "wb")
        argv = [binary(), f"--config-file={self.config}"]
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        with log:
            self.process = subprocess.Popen(
                argv, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        atexit.register(self.remove)
        deadline = reactor.seconds() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"clickhouse-server ended with {self.process.returncode}:\n{self.tail()}")
            try:
                response = yield self.http.get(self.url + "/ping", timeout=2)
                body = yield treq.content(response)
                if response.code == 200 and body.strip() == b"Ok.":
                    return
            except Exception:
                pass
            if reactor.seconds() > deadline:
                self.kill()
                raise RuntimeError(f"clickhouse-server did not answer within {START_SECONDS} s:\n{self.tail()}")
            yield deferLater(0.1)

    @defer.inlineCallbacks
    def query(self, sql: str, user: str | None = None, password: str | None = None):
        """The text of a query's answer; fails with ClickHouse's message on an error."""
        auth = (user, password) if user else None
        response = yield self.http.post(self.url + "/", data=sql.encode("utf-8"), auth=auth, timeout=30)
        body = yield treq.content(response)
        if response.code != 200:
            raise RuntimeError(f"HTTP {response.code}: {body.decode('utf-8', 'replace')}")
        return body.decode("utf-8")

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM, then SIGKILL after STOP_SECONDS; the directory removed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            deadline = reactor.seconds() + STOP_SECONDS
            while self.process.poll() is None and reactor.seconds() < deadline:
                yield deferLater(0.05)
            self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """Kill at once (a start that failed, or a stop that took too long)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        """At exit, when the last test of the class did not run here: kill, then remove."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def tail(self, count: int = 30) -> str:
        """The end of the server's own output and error log."""
        lines = []
        for name in ("stdout.log", os.path.join("var_log_clickhouse-server", "clickhouse-server.err.log")):
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8", errors="replace") as f:
                    lines += f.read().splitlines()[-count:]
            except OSError:
                pass
        return "\n".join(lines)


def deferLater(seconds: float) -> defer.Deferred:
    """Fires after `seconds` of the real reactor."""
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class Shared:
    """The server of one test class: started by its first test, stopped after its last."""

    def __init__(self) -> None:
        self.server: ClickHouseServer | None = None
        self.left = 0
        self._starting: defer.Deferred | None = None

    @defer.inlineCallbacks
    def acquire(self, case):
        """The running server, for a test case; its cleanup lets go of it."""
        if self.server is None:
            tests = [name for name in dir(type(case)) if name.startswith("test")]
            self.left = len(tests)
            self.server = ClickHouseServer()
            try:
                yield self.server.start()
            except Exception:
                server, self.server = self.server, None
                yield server.stop()
                raise
        case.addCleanup(self._release)
        return self.server

    def _release(self):
        self.left -= 1
        if self.left > 0 or self.server is None:
            return None
        server, self.server = self.server, None
        return server.stop()
