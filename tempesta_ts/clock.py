"""Time that a wall-clock step does not bend: the reactor's timers on the monotonic clock, wall
time only for the times shown and sent, and one log line when the wall clock jumps.

Twisted's reactor measures its timers (``callLater``) on ``reactor.seconds``, which is
``time.time``: stepped back an hour, every timer (settle, cooldown, retries, partial lines, idle
TCP) waits an hour more. `use_monotonic_time` makes ``reactor.seconds`` the monotonic clock,
started where the wall clock stood, so every part keeps taking its clock from the reactor.
"""

from __future__ import annotations

import time
from typing import Callable

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

#: How often the wall clock is compared with the monotonic one.
WATCH_SECONDS = 1.0
#: A difference of more than this between the two in one interval is a step.
STEP_SECONDS = 2.0


class MonotonicSeconds:
    """``time.monotonic`` shifted to read as the wall clock did when it was made."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self.wall = wall
        self.base = wall() - monotonic()

    def __call__(self) -> float:
        return self.monotonic() + self.base

    def wall_offset(self) -> float:
        """What to add to a time of this clock to read it on the wall clock now."""
        return self.wall() - self()


def use_monotonic_time(reactor) -> MonotonicSeconds:
    """Make the reactor's timers monotonic (once); timers already set keep their times, which
    the new clock continues."""
    seconds = getattr(reactor, "seconds", None)
    if isinstance(seconds, MonotonicSeconds):
        return seconds
    seconds = MonotonicSeconds()
    reactor.seconds = seconds
    # The calls already waiting measure their delay() and reset() with the old function.
    for call in [*getattr(reactor, "_pendingTimedCalls", ()), *getattr(reactor, "_newTimedCalls", ())]:
        call.seconds = seconds
    return seconds


def wall_offset_of(clock) -> Callable[[], float]:
    """What to add to the clock's times to show them as wall time: 0 for a clock that is
    the wall clock already (task.Clock in tests, a reactor left as it is)."""
    seconds = getattr(clock, "seconds", None)
    if isinstance(seconds, MonotonicSeconds):
        return seconds.wall_offset
    return lambda: 0.0


class ClockWatch(service.Service):
    """Logs one line each time the wall clock jumps against the clock the timers keep to."""

    # Unfiltered by log_level: a clock step explains odd times in the reports.
    log = Logger()

    def __init__(self, clock, wall: Callable[[], float] = time.time,
                 interval: float = WATCH_SECONDS) -> None:
        self.clock = clock
        self.wall = wall
        self.interval = interval
        self._loop = task.LoopingCall(self._look)
        self._loop.clock = clock
        self._last: tuple[float, float] | None = None

    def startService(self) -> None:
        super().startService()
        self._last = (self.clock.seconds(), self.wall())
        self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _look(self) -> None:
        try:
            now, wall = self.clock.seconds(), self.wall()
            if self._last is not None:
                step = (wall - self._last[1]) - (now - self._last[0])
                if abs(step) > STEP_SECONDS:
                    self.log.warn(
                        "The wall clock jumped {way} by {seconds:.0f} s; timers keep to the "
                        "monotonic clock, times shown and sent follow the wall clock",
                        way="forward" if step > 0 else "back", seconds=abs(step),
                    )
            self._last = (now, wall)
        except Exception:
            self.log.failure("Could not compare the clocks")
