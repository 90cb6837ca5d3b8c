"""Bounded waits for tests that use real sockets and so real time."""

from __future__ import annotations

from twisted.internet import defer, reactor


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> defer.Deferred:
    """Fire when predicate() is true; fail after `timeout` seconds."""
    d = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check():
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"condition not met within {timeout} s"))
        else:
            reactor.callLater(interval, check)

    check()
    return d
