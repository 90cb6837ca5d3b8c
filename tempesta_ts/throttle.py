"""When to log a recurring event: the first of a burst, then at most once an interval.

A flood of bad datagrams must not become a flood of log lines. Pure code: time is passed in.
"""

from __future__ import annotations


class Throttle:
    """Per-key log gate: `hit` says whether to log now and how many were held back since."""

    def __init__(self, interval: float, max_keys: int = 10000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[object, float] = {}
        self._held: dict[object, int] = {}

    def hit(self, key: object, now: float) -> int | None:
        """None to stay quiet; else log now, with the count of events held back since last."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if last is None and len(self._last) >= self.max_keys:
            # Many distinct keys (a flood of spoofed sources): forget them rather than grow.
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)


class Budget:
    """Total log gate over many keys: at most `count` notices an interval, whatever their keys.

    A per-key Throttle bounds each key; a flood of distinct keys (3,000 spoofed sources) needs
    a bound on all of them together.
    """

    def __init__(self, interval: float, count: int) -> None:
        self.interval = interval
        self.count = count
        self._started: float | None = None
        self._spent = 0
        self._held = 0

    def take(self, now: float) -> int | None:
        """None to stay quiet; else log now, with the count of notices held back since."""
        if self._started is None or now - self._started >= self.interval:
            self._started = now
            self._spent = 0
        if self._spent >= self.count:
            self._held += 1
            return None
        self._spent += 1
        held, self._held = self._held, 0
        return held


def held_back(count: int | None, what: str) -> str:
    """The suffix naming what a notice held back, `` (3 more ...)``; none for zero."""
    return f" ({count} {what})" if count else ""
