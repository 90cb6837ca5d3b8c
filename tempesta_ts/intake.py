"""What the UDP and TCP listeners share: where data goes, who may send, counters, notices."""

from __future__ import annotations

from collections import Counter

from twisted.internet.interfaces import IReactorTime

from tempesta_ts.access import SourceFilter
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.log import get_logger
from tempesta_ts.throttle import Budget, Throttle, held_back

#: A recurring notice (a rejected source, a failure) is logged at most once this often.
NOTICE_SECONDS = 60.0
#: Refused sources named in the log each NOTICE_SECONDS, all sources together.
REFUSAL_NOTICES = 5


class Intake:
    """The registry and clock the listeners feed, the access list, and rate-limited notices."""

    log = get_logger(__name__)

    def __init__(
        self, registry: BufferRegistry, clock: IReactorTime, sources: SourceFilter, stats: Counter
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.sources = sources
        self.stats = stats
        self._throttle = Throttle(NOTICE_SECONDS)
        self._refusals = Budget(NOTICE_SECONDS, REFUSAL_NOTICES)

    def admits(self, host: str, transport: str) -> bool:
        """Whether `host` is in allowed_sources; a rejection is counted and noticed."""
        if self.sources.allows(host):
            return True
        self.stats["sources_rejected"] += 1
        now = self.clock.seconds()
        held = self._throttle.hit(("reject", transport, host), now)
        if held is None:
            return False
        # Each source is noticed once a minute, and only a few sources a minute in all.
        others = self._refusals.take(now)
        if others is not None:
            self.log.warn(
                "Rejected {transport} from {source}: not in allowed_sources{more}",
                transport=transport,
                source=host,
                held=held,
                others=others,
                more=held_back(held, "more from it held back since its last notice")
                + held_back(others, "other refused sources not named"),
            )
        return False

    def notice(self, key: object, message: str, **fields) -> None:
        """Warn, at most once a minute per key, with the count held back since."""
        held = self._throttle.hit(key, self.clock.seconds())
        if held is not None:
            self.log.warn(message + "{more}", held=held,
                          more=held_back(held, "more held back since the last notice"), **fields)

    def failed(self, what: str, source: object) -> None:
        """Count an unexpected failure; log its traceback once per burst. Call from an except."""
        self.stats[f"{what}_errors"] += 1
        held = self._throttle.hit(("failure", what), self.clock.seconds())
        if held is not None:
            self.log.failure(
                "Failed in {what} from {source}{more}",
                more=held_back(held, "more failures held back"),
                what=what,
                source=source,
                held=held,
            )
