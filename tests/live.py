"""A whole server on the real reactor, for tests over real loopback sockets."""

from __future__ import annotations

from twisted.internet import reactor

from tempesta_ts.config import Config
from tempesta_ts.service import TroubleshootingService


def start_live(case, config: Config) -> TroubleshootingService:
    """The service of `config` started on the real reactor, its web endpoint on a free port;
    stopped at the test case's cleanup."""
    svc = TroubleshootingService(config, reactor)
    # The configuration's 0 turns the endpoint off; the test wants a free port.
    svc.web.port = 0
    svc.privilegedStartService()
    svc.startService()
    case.addCleanup(svc.stopService)
    return svc
