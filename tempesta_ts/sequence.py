"""Netconsole's sequence numbers: messages lost in gaps, duplicates, reboots, strays.

The extended format numbers every message (the kernel's printk sequence number, from 0 at
boot) and gives its kernel time. `SequenceTracker` follows one instance's numbering. The rule:
the numbers count losses and duplicates; they never make the server drop a message other than
the same message received again. Pure code.
"""

from __future__ import annotations

from array import array
from collections import Counter

#: How far back numbers skipped are remembered (a late one takes its loss back), and the
#: longest jump forward taken as a gap; a longer one breaks the numbering.
SEQ_WINDOW = 1024
#: How far below the highest sequence number a message may arrive and still be a late one.
REORDER_WINDOW = 64
#: A message whose kernel time is this much before the newest one's comes from a new boot.
REBOOT_MARGIN_US = 1_000_000
#: How many recent numbers' kernel times are kept to tell a duplicate (the same message again)
#: from another message under a number already seen. A power of 2.
DUPLICATE_WINDOW = 128
DUPLICATE_MASK = DUPLICATE_WINDOW - 1
#: The highest sequence number taken for a kernel's. Its counter is 64 bits but counts one a
#: message since boot: at 100,000 messages a second without pause it takes 89 years to get here.
MAX_SEQ = 2**48
#: The most one jump forward in the numbering adds to the messages counted lost.
MAX_GAP = 100_000

# What tells a message: its kernel time, or where that is 0 (early boot, before the clock
# runs) a hash of its text, with the top bit set; _UNKNOWN: nothing (never a duplicate).
_UNKNOWN = 2**64 - 1
_TEXT_KEY = 2**63
_TEXT_HASH = 2**62 - 1


def _identity(time_us: int | None, text: bytes | None) -> int:
    if time_us:
        return time_us if time_us < _UNKNOWN else _UNKNOWN
    if time_us is None or text is None:
        return _UNKNOWN
    return _TEXT_KEY | (hash(text) & _TEXT_HASH)


class SequenceTracker:
    """Counts messages lost in sequence gaps and drops duplicates; never drops anything else.

    No set of every number seen is kept: a number at or below the highest, not counted
    missing, has been seen. What was skipped in the last SEQ_WINDOW numbers is remembered as
    missing, so a late arrival takes its loss back. A duplicate is a number among the last
    DUPLICATE_WINDOW seen with the same kernel time (the same text where the time is 0);
    another message under a number seen is kept. A message that breaks the numbering (a
    reboot, a long jump, another kernel at the same address) is kept and only starts a new
    numbering once the next one continues it: one stray or forged number moves nothing.
    """

    __slots__ = ("highest", "highest_time", "first", "lost", "times", "stats", "_missing",
                 "_candidate")

    def __init__(self, stats: Counter | None = None) -> None:
        self.highest: int | None = None
        self.highest_time: int | None = None
        #: The lowest number seen since the numbering (re)started.
        self.first: int | None = None
        self.lost = 0
        #: What tells the messages of the last DUPLICATE_WINDOW numbers apart (their kernel
        #: time, see _identity), each at seq & DUPLICATE_MASK. An array: one per instance, of
        #: 64-bit numbers, not objects.
        self.times = array("Q")
        self.stats = stats if stats is not None else Counter()
        self._missing: set[int] = set()
        #: The message that broke the numbering last: its number, time, the highest then and
        #: its identity.
        self._candidate: tuple[int, int | None, int, int] | None = None

    def accept(self, seq: int, time_us: int | None = None, text: bytes | None = None) -> bool:
        """Whether to keep a message (False: a duplicate); counts. `text` is its first line."""
        highest = self.highest
        key = _identity(time_us, text)
        if highest is not None and seq == highest + 1:
            self.highest, self.highest_time = seq, time_us
        elif seq > MAX_SEQ:
            # No kernel's: kept and not followed, or every message after it would look old.
            self.stats["out_of_order_messages"] += 1
            return True
        elif highest is None:
            self._restart(seq, time_us, key)
            return True
        elif highest < seq <= highest + SEQ_WINDOW:
            self._gap(seq, time_us)
        elif seq in self._missing:
            # A late arrival (a slow fragment): it was counted lost, it is not.
            self._missing.discard(seq)
            self.lost -= 1
        elif seq == highest and self._seen(seq, key):
            # The newest message again (two netconsole targets), even numbered 0.
            return False
        elif self._continues_candidate(seq, time_us):
            self._take_candidate()
            return self.accept(seq, time_us, text)
        elif (
            seq > highest
            # The kernel numbers from 0 at boot.
            or (seq == 0 and (self.first == 0 or highest > REORDER_WINDOW))
            # A new boot whose first numbers were not sent (below the console log level).
            or self._clock_went_back(time_us)
        ):
            return self._break(seq, time_us, key)
        elif highest - seq < DUPLICATE_WINDOW and self._seen(seq, key):
            return False
        elif seq < self.first and self.first - seq <= REORDER_WINDOW:
            # Overtaken before anything else was seen (the first datagrams of a stream).
            self.first = seq
        elif highest - seq > SEQ_WINDOW and (
            time_us is None or self.highest_time is None or time_us >= self.highest_time
        ):
            # Far below what was seen, and no older than the newest: another numbering.
            return self._break(seq, time_us, key)
        else:
            # Later than the windows (its time is a little older than the newest's), or
            # another message under a number seen.
            self.stats["out_of_order_messages"] += 1
        self._note(seq, key)
        return True

    def _seen(self, seq: int, key: int) -> bool:
        return key != _UNKNOWN and self.times[seq & DUPLICATE_MASK] == key

    def _note(self, seq: int, key: int) -> None:
        if self.highest - seq < DUPLICATE_WINDOW:
            self.times[seq & DUPLICATE_MASK] = key

    def _gap(self, seq: int, time_us: int | None) -> None:
        highest = self.highest
        self.lost += min(seq - highest - 1, MAX_GAP)
        self._missing.update(range(max(highest + 1, seq - SEQ_WINDOW), seq))
        if len(self._missing) > SEQ_WINDOW:
            self._missing = {s for s in self._missing if s > seq - SEQ_WINDOW}
        self.highest, self.highest_time = seq, time_us

    def _break(self, seq: int, time_us: int | None, key: int) -> bool:
        # Kept, but the numbering followed stays as it is until a second message continues
        # this one. The same message again (a second netconsole target) is a duplicate.
        candidate = (seq, time_us, self.highest, key)
        if candidate == self._candidate and key != _UNKNOWN:
            return False
        self._candidate = candidate
        self.stats["out_of_order_messages"] += 1
        return True

    def _continues_candidate(self, seq: int, time_us: int | None) -> bool:
        # Near the candidate's number, not much older, and nothing moved on since it came.
        candidate = self._candidate
        if candidate is None or candidate[2] != self.highest or candidate[0] == seq:
            return False
        start, start_time, _, _ = candidate
        if abs(seq - start) > REORDER_WINDOW:
            return False
        return time_us is None or start_time is None or time_us + REBOOT_MARGIN_US >= start_time

    def _take_candidate(self) -> None:
        seq, time_us, _, key = self._candidate
        self._candidate = None
        if seq > self.highest and not self._clock_went_back(time_us):
            # A long loss within one boot: counted, at most MAX_GAP.
            self._gap(seq, time_us)
            self._note(seq, key)
        else:
            self.stats["sequence_restarts"] += 1
            self._restart(seq, time_us, key)

    def _clock_went_back(self, time_us: int | None) -> bool:
        last = self.highest_time
        return time_us is not None and last is not None and time_us + REBOOT_MARGIN_US < last

    def _restart(self, seq: int, time_us: int | None, key: int) -> None:
        self.highest = self.first = seq
        self.highest_time = time_us
        self._missing.clear()
        self._candidate = None
        self.times = _NO_TIMES[:]
        self._note(seq, key)


_NO_TIMES = array("Q", [_UNKNOWN]) * DUPLICATE_WINDOW
