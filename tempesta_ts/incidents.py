"""Incident detection: which kernel log line starts an incident, and of what kind.

An incident is what the vendor must hear about: a panic, an oops, a kernel BUG (lockups, hung
tasks, RCU stalls, sanitizer reports), a WARNING, or an error or warning from a Tempesta FW module
(``[tempesta fw] ERROR: ...``). `Rules.detect` looks at one line at a time and says whether it
opens one; the lines that follow (registers, call trace) belong to it until `is_end_marker` or a
quiet spell, which is the caller's business. `signature` names an incident so that repeats from
other CPUs, tasks or addresses fold into one.

Every built-in rule is anchored where the kernel puts these headers: at the start of the line,
after blanks and caller ids, or after a console time stamp inside the line (a console merged
another writer's unfinished line with the kernel's). Other text in the middle of a line (an
access log's URI, "error" in a driver's message, Spectre's "WARNING: Unprivileged eBPF ...")
never starts an incident, and neither does a line that merely starts with the word WARNING.
docs/incidents.md lists the rules, where each shape comes from and the corpus they are
measured on. Pure code: no Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

#: Incident kinds, most severe first.
KINDS = ("crash", "oops", "bug", "warning", "error")

# Tempesta FW's modules prefix their messages with "[tempesta <module>] " (lib/log.h: BANNER is
# "fw", "tls", ...), older versions with "[tempesta] ", Tempesta DB with "[tdb] "; T_ERR adds
# "ERROR: ", T_WARN "Warning: ". The System Verification Script's "[tempesta sc]" lines are
# reports of its checks, not module errors.
_TEMPESTA = r"\[(?:tempesta(?: (?!sc\])[a-z0-9_]+)?|tdb)\] "

_TEMPESTA_START = re.compile(_TEMPESTA)

_LOWER = "abcdefghijklmnopqrstuvwxyz"

# The reports of kernel/locking/lockdep.c. Since 4.14 each header starts with "WARNING: ";
# before, with "[ INFO: " (the same reports) or "[ BUG: " (rule lockdep-bug); "Invalid wait
# context" still prints "[ BUG: ".
_LOCKDEP = (
    r"possible (?:circular locking dependency|recursive locking|irq lock inversion dependency)"
    r"|inconsistent lock state|bad unlock balance|bad contention|held lock freed"
    r"|lock held when returning to user space|[Nn]ested lock was not taken"
    r"|\S+-safe -> \S+-unsafe lock order|.+ still has locks held!|chain_key collision"
)

#: The built-in rules, tried in this order (the first that matches names the incident):
#: (rule, kind, the characters a matching header can start with, pattern matched at its start).
RULES: tuple[tuple[str, str, str, str], ...] = (
    ("sysrq-crash", "crash", "sS", r"(?:sysrq: |SysRq : )Trigger a crash"),
    ("kernel-panic", "crash", "K", r"Kernel panic\b"),
    # x86 exc_double_fault(): this line, then die("double fault") and panic("Machine halted.").
    ("double-fault", "crash", "P", r"PANIC: double fault\b"),
    # die()'s header on x86, "<trap>: <error code> [#<count>]", "Oops: " before it from 6.10.
    (
        "trap",
        "oops",
        _LOWER + "O",
        r"(?:Oops: )?[a-z][a-z0-9_ ()-]*(?:, [^:]*)?: [0-9a-f]{4} \[#\d+\]",
    ),
    # die() elsewhere: "Oops: 0002 [#1]", "Oops - BUG [#1]", riscv's "Oops [#1]", mips' "Oops[#1]:".
    ("oops", "oops", "O", r"Oops(?::| -| ?\[#)"),
    ("internal-error", "oops", "I", r"Internal error: "),
    # arm, arm64, riscv; mips puts "CPU <n> " before it.
    ("unable-to-handle", "oops", "UC", r"(?:CPU \d+ )?Unable to handle kernel "),
    (
        "arm64-exception",
        "oops",
        "SB",
        r"(?:SError Interrupt on CPU\d|Bad mode in .+ handler detected)",
    ),
    # x86 (and powerpc) page faults in the kernel: "Oops:" follows, as on arm64 it follows
    # "Unable to handle kernel ...".
    (
        "page-fault",
        "oops",
        "B",
        r"BUG: (?:[Kk]ernel NULL pointer dereference|[Uu]nable to handle )",
    ),
    ("kernel-bug", "bug", "kK", r"[Kk]ernel BUG at "),
    ("soft-lockup", "bug", "NwB", r"(?:(?:NMI )?watchdog: )?BUG: soft lockup\b"),
    (
        "hard-lockup",
        "bug",
        "NwCW",
        r"(?:(?:NMI )?watchdog: )?(?:CPU\d+: )?(?:Watchdog detected hard LOCKUP"
        r"|Watchdog CPU:\d+ (?:detected )?Hard LOCKUP)",
    ),
    ("kasan", "bug", "B", r"BUG: KASAN: "),
    ("kmsan", "bug", "B", r"BUG: KMSAN: "),
    ("kcsan", "bug", "B", r"BUG: KCSAN: "),
    ("kfence", "bug", "B", r"BUG: KFENCE: "),
    ("atomic-sleep", "bug", "B", r"BUG: (?:sleeping function called|scheduling while atomic)"),
    ("workqueue-lockup", "bug", "B", r"BUG: workqueue lockup\b"),
    # mm/kmemleak.c with kmemleak.verbose=1 (pr_fmt "kmemleak: "); syzkaller's executor prints
    # "BUG: memory leak" before the objects it reads from /sys/kernel/debug/kmemleak.
    (
        "memory-leak",
        "bug",
        "Bku",
        r"(?:BUG: memory leak\b|(?:kmemleak: )?unreferenced object 0x[0-9a-f]+ \(size \d+\):)",
    ),
    ("bug", "bug", "B", r"BUG: "),
    # mm/slub.c slab_bug(): "BUG kmalloc-128 (Not tainted): Redzone overwritten", before 3.x
    # without the taint ("BUG kmalloc-64: Poison overwritten"), memcg caches named
    # "kmalloc-256(0:<id>)"; mm/slab.c: "Slab corruption (Not tainted): kmalloc-64 start=...".
    (
        "slab-corruption",
        "bug",
        "BS",
        r"(?:BUG [\w.:()-]+(?: \((?:Not tainted|Tainted: [^)]*)\))?"
        r"|Slab corruption \((?:Not tainted|Tainted: [^)]*)\)): ",
    ),
    ("ubsan", "bug", "U", r"UBSAN: "),
    (
        "hung-task",
        "bug",
        "I",
        r"INFO: task .+ (?:blocked (?:in I/O wait )?for more than \d+ seconds"
        r"|can't die for more than )",
    ),
    (
        "rcu-stall",
        "bug",
        "rI",
        r"(?:rcu: )?INFO: rcu_\w+ (?:self-)?detected (?:expedited )?stalls?\b",
    ),
    # net/core/dev.c netdev_wait_allrefs(): a device's reference count never drops (a leak).
    ("netdev-refcount", "bug", "u", r"unregister_netdevice: waiting for \S+ to become free\b"),
    # fs/open.c filp_close() and fs/super.c generic_shutdown_super(): use-after-free signs.
    ("vfs", "bug", "V", r"VFS: (?:Close: file count is 0|Busy inodes after unmount)\b"),
    ("lockdep-bug", "bug", "[", r"\[ BUG: "),
    ("tempesta-error", "error", "[", _TEMPESTA + r"(?:ERROR|Error): "),
    ("tempesta-warning", "warning", "[", _TEMPESTA + r"(?:Warning|WARNING): "),
    # kernel/panic.c __warn(): "WARNING: CPU: 1 PID: 42 at file:line func" (3.11 to 6.18),
    # "WARNING: file:line at func, CPU#1: comm/42" (6.19), "WARNING: at ..." (older, or no file);
    # with the condition's text before the file where the kernel keeps it (7.0, syzbot's 2026
    # reports: "WARNING: [time_after(jiffies, timeout)] io_uring/io_uring.c:3026 at ...").
    (
        "kernel-warning",
        "warning",
        "W",
        r"WARNING: (?:CPU: \d+ PID: \d+ at |at |(?:\[[^\]\n]{1,256}\] )?\S+:\d+ at )",
    ),
    ("lockdep", "warning", "WI[", r"(?:WARNING: |\[ INFO: |INFO: )(?:" + _LOCKDEP + ")"),
    (
        "suspicious-rcu",
        "warning",
        "WI[",
        r"(?:WARNING: |\[ INFO: |INFO: )suspicious (?:RCU|rcu_dereference_check\(\)) usage",
    ),
    # lockdep's register_lock_class(): a lock used before it was initialised.
    ("non-static-key", "warning", "I", r"INFO: trying to register non-static key\b"),
    # arch/x86/kernel/unwind_frame.c: a corrupted stack.
    ("unwinder", "warning", "W", r"WARNING: kernel stack (?:regs|frame pointer) at "),
    # The vendor's check that the whole path works: echo "WARNING test message" > /dev/kmsg.
    ("test-message", "warning", "W", r"WARNING test message\b"),
)

#: What may come before a header: blanks and CONFIG_PRINTK_CALLER's "[  T123]" or "[    C1]".
#: Written so that a run of blanks can be matched one way only: a pattern that could split
#: it in many ways would try them all on a line of blanks that no header follows.
LEAD = r"[ \t]*(?:\[[ \t]*[TC]\d+\][ \t]*)*"
_LEAD = re.compile(LEAD)
#: A console time stamp inside a line: the console merged another writer's unfinished line
#: ("syzkaller login: [   16.305150] INFO: ...", "** 5311 printk messages dropped **
#: [   60.130000] ...") with a kernel line. A LEAD may follow it.
STAMP = r"\[[ \t]*\d+\.\d+\]"
# With CONFIG_PRINTK_CALLER the console puts "[  T123] " or "[    C1] " after the time stamp.
_CALLER = re.compile(r"\[\s*[TC]\d+\] ?")
_END_MARKER = re.compile(r"-{2,}\[ end (?:trace\b|Kernel panic\b)")


@dataclass(frozen=True, slots=True)
class Detection:
    """An incident line: its kind (one of KINDS) and the rule that matched."""

    kind: str
    rule: str
    ends_trace: bool = False


def _rules_by_first_character() -> dict[str, list[tuple[str, str, str]]]:
    rules: dict[str, list[tuple[str, str, str]]] = {}
    for rule, kind, first, pattern in RULES:
        for character in first:
            rules.setdefault(character, []).append((rule, kind, pattern))
    return rules


def _required(group: list[tuple[str, str, str]]) -> str:
    # The text every rule of a group needs (REQUIRED_TEXT), or "" when one of them needs none.
    required = {REQUIRED_TEXT.get(rule) for rule, _, _ in group}
    return required.pop() if len(required) == 1 and None not in required else ""


def _by_first_character() -> dict[str, tuple[re.Pattern, tuple[Detection, ...], str]]:
    # Per first character, one alternation of the rules a line starting with it can match, one
    # group per rule, and the text such a line must hold: a dictionary look-up rejects most
    # lines (call traces start with a space), and one match() call decides the rest.
    return {
        character: (
            re.compile("|".join(f"({pattern})" for _, _, pattern in group)),
            tuple(Detection(kind, rule) for rule, kind, _ in group),
            _required(group),
        )
        for character, group in _rules_by_first_character().items()
    }


#: Text that every line a rule matches contains, for the rules whose pattern would otherwise
#: run on most lines: "trap" is tried on every line that starts with a lowercase letter.
#: Looking for the text first is several times cheaper than running the pattern.
REQUIRED_TEXT = {"trap": " [#"}

#: Per first byte of a line: the text it must contain (b"" for none) and the pattern it
#: must match at its start for the incident rules to see it; None: no rule can match it.
LineFilter = tuple[tuple[bytes, re.Pattern] | None, ...]


# The filter's entry for "[": a caller id ("[  T650] ", anything may follow it), lockdep's old
# "[ BUG: " and "[ INFO: " headers and Tempesta's ERROR and Warning banners, as one pattern
# whose alternatives share the "[": Tempesta's own lines, the commonest on the hot path, are
# told apart at the word after the banner.
_BRACKET_FILTER = (
    r"\[(?:[ \t]*[TC]\d+\]| (?:BUG|INFO): |" + _TEMPESTA[2:] + r"(?:ERROR|Error|Warning|WARNING): )"
)


def _bytes_filter() -> LineFilter:
    # The same alternations as bytes patterns, indexed by a line's first byte; a line that
    # starts with a caller id ("[  T123] ") passes whatever follows. For ASCII text a bytes
    # pattern matches exactly where its str twin does. Two places `detect` looks at are left
    # out, as no netconsole record puts a header there: after blanks at the start (call trace
    # lines start with a blank: looking at them would cost every one a pattern), and after a
    # time stamp inside a line (the decoder gives a line that does not start with a time stamp
    # but holds one to its general path, where every line is seen).
    table: list[tuple[bytes, re.Pattern] | None] = [None] * 256
    for character, group in _rules_by_first_character().items():
        alternatives = [pattern for _, _, pattern in group]
        if character == "[":
            alternatives = [_BRACKET_FILTER]
        pattern = re.compile("|".join(f"(?:{p})" for p in alternatives).encode())
        table[ord(character)] = (_required(group).encode(), pattern)
    return tuple(table)


_DISPATCH = _by_first_character()
_BYTES_FILTER = _bytes_filter()


def _without_caller(text: str) -> str:
    if text.startswith("[") and (caller := _CALLER.match(text)):
        return text[caller.end() :]
    return text


def _header_at(text: str, start: int) -> Detection | None:
    entry = _DISPATCH.get(text[start : start + 1])
    if entry is None or (entry[2] and entry[2] not in text):
        return None
    m = entry[0].match(text, start)
    return None if m is None else entry[1][m.lastindex - 1]


# A time stamp inside a line that a header follows: one search finds it. The alternatives are
# not groups: a group in front of each would keep the regular expression engine from skipping
# an alternative by its first character, which makes the search ten times slower.
_AFTER_STAMP = re.compile(
    f"{STAMP}{LEAD}(?=[^ \t])(?="
    + "|".join(f"(?:{pattern})" for _, _, _, pattern in RULES)
    + ")"
)


def find_header(text: str) -> tuple[int, Detection] | None:
    """Where in a line the header of a built-in rule starts, and that rule's detection.

    The header is at the start, after blanks or a caller id, or after a console time stamp
    inside the line (a merged line); None when no built-in rule matches.
    """
    # Most lines are decided by the first look-up; the rest only for the rare line that
    # starts with a blank or "[", or that holds a time stamp.
    first = text[:1]
    entry = _DISPATCH.get(first)
    if entry is not None and (not entry[2] or entry[2] in text):
        if (m := entry[0].match(text)) is not None:
            return 0, entry[1][m.lastindex - 1]
    if first == " " or first == "\t":
        # Blanks first (call trace lines): strip them without a pattern.
        start = len(text) - len(text.lstrip(" \t"))
        if text[start : start + 1] == "[":
            start = _LEAD.match(text, start).end()
        if (found := _header_at(text, start)) is not None:
            return start, found
    elif first == "[" and (start := _LEAD.match(text).end()):
        if (found := _header_at(text, start)) is not None:
            return start, found
    if "] " in text and (stamp := _AFTER_STAMP.search(text)) is not None:
        # Not where a client's text can be: Tempesta's access log quotes the URI and the
        # User-Agent after its banner, and the kernel quotes what it was given (comm="...").
        before = text[: stamp.start()]
        if '"' in before or _TEMPESTA_START.match(before):
            return None
        found = _header_at(text, stamp.end())
        return None if found is None else (stamp.end(), found)
    return None


class Rules:
    """The built-in rules plus the config's extra and ignore patterns."""

    def __init__(self, extra: Iterable[tuple[str, str]] = (), ignore: Iterable[str] = ()) -> None:
        extras = []
        for number, (kind, pattern) in enumerate(extra, 1):
            if kind not in KINDS:
                raise ValueError(f"incident kind {kind!r} is not one of {', '.join(KINDS)}")
            extras.append((re.compile(pattern), Detection(kind, f"extra-{number}")))
        self._extra = tuple(extras)
        self._ignore = tuple(re.compile(pattern) for pattern in ignore)

    @property
    def line_filter(self) -> LineFilter | None:
        """Per first byte, what every ASCII line `detect` finds contains and matches at its
        start (`LineFilter`), except headers after leading blanks or after a time stamp inside
        the line; None with extra patterns, which may match anywhere. Lets the hot path skip
        most lines without decoding them."""
        return None if self._extra else _BYTES_FILTER

    def detect(self, text: str) -> Detection | None:
        """The incident a log line starts, or None.

        `text` is one kernel log line without the console's time stamp, as the decoder gives it;
        a time stamp further in (a merged line) is looked behind.
        """
        found: Detection | None = None
        for pattern, detection in self._extra:
            if pattern.search(text):
                found = detection
                break
        else:
            header = find_header(text)
            if header is not None:
                found = header[1]
        # Ignore patterns win; they are only worth running on the rare line that matched.
        if found is not None and any(pattern.search(text) for pattern in self._ignore):
            return None
        return found


def is_end_marker(text: str) -> bool:
    """True for the line that closes a trace: '---[ end trace ...]---', '---[ end Kernel panic'."""
    return _END_MARKER.match(_without_caller(text)) is not None


# What varies between repeats of one incident, masked; source locations are kept whole because
# they name the call site (two WARN_ONs in one file differ only by line).
_VARYING = re.compile(
    r"(?P<keep>(?<![\w.+/-])[\w.+/-]*\.(?:c|h|S|rs):\d+(?::\d+)?)"
    r"|(?P<comm>\[[^\[\]\s]+:\d+\])"  # [comm:pid] of lockup reports
    r"|(?P<cpu>CPU#\d+: .*$)"  # "..., CPU#1: comm/pid" ending newer WARNING lines
    r"|(?P<hex>0x[0-9a-fA-F]+|\b[0-9a-fA-F]{8,}\b)"
    r"|(?P<num>(?<!\w)\d+)"
)
_MASKS = {"comm": "[COMM]", "cpu": "CPU#N: COMM", "hex": "X", "num": "N"}
_SPACES = re.compile(r"\s+")
#: Longest line part a signature keeps; past it, repeats are told apart by the beginning.
SIGNATURE_CHARS = 512


def _mask(m: re.Match) -> str:
    group = m.lastgroup
    if group == "keep":
        return m.group()
    if group == "hex" and m.group().startswith("0x"):
        return "0xX"
    return _MASKS[group]


def signature(kind: str, text: str) -> str:
    """The kind plus the line with numbers, addresses, CPUs, PIDs and task names masked.

    The same warning from another CPU, task or address has the same signature, so repeats fold.
    A built-in rule's header is taken from where it starts: what a console merged in front of
    it is not part of the incident.
    """
    header = find_header(text)
    text = _without_caller(text) if header is None else text[header[0] :]
    masked = _VARYING.sub(_mask, text[: SIGNATURE_CHARS * 4])
    masked = _SPACES.sub(" ", masked).strip()[:SIGNATURE_CHARS]
    return f"{kind}: {masked}"
