"""Titles: name an incident the way kernel developers do, from its trigger line and trace.

``KASAN: use-after-free Read in tfw_http_msg_free``, ``WARNING in skb_warn_bad_offload``,
``INFO: task hung in jbd2_journal_commit_transaction``: the convention of syzbot's reports and
the kernel's mailing lists. The kind of report comes from its header line; the function is the
guilty frame, the first frame of the report that is not part of the reporting machinery
(printing, WARN/BUG helpers, sanitizer and lockdep internals, allocation and locking wrappers).
The facts (header shapes, where each kind of report names its function, which frames to skip)
are those of syzkaller's pkg/report/linux.go; the table of titles is `tempesta_ts.title_formats`.
`describe` runs when a report is made, never per line received. Pure code: no Twisted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

from tempesta_ts.frames import (
    STACK_START,
    Frame,
    first_trace,
    frame_at,
    is_questionable,
    line_frames,
)
from tempesta_ts.title_formats import (
    GROUPS,
    REPORT_START_IGNORES,
    SKIP,
    STACK,
    STRIP_PREFIXES,
    TitleFormat,
)

#: Lines of an incident's window (its trigger line and what follows) a title is made from: a
#: stack overflow's trace runs to several hundred lines before its entry point.
WINDOW_LINES = 1024
#: Longest title (syzkaller's limit: corrupted lines can be very long).
MAX_TITLE_CHARS = 120
#: After this many lines of a report, a panic (panic_on_warn) or a lockdep report that the
#: report's own printing caused is not part of it.
_REPORT_MIN_LINES = 22

_CONSOLE = re.compile(
    r"(?:\*\* \d+ printk messages dropped \*\* )?(?:.* login: )?(?:<\d+>)?\[\s*\d+\.\d+\]"
    r"(?:\[\s*[TC]\d+\])? ?"
)
_CALLER = re.compile(r"\[\s*([TC]\d+)\] ?")
_TEMPESTA = re.compile(r"\[(?:tempesta(?: (?P<banner>[a-z0-9_]+))?|(?P<tdb>tdb))\] ")
_TEMPESTA_INCIDENT = re.compile(_TEMPESTA.pattern + r"(?:ERROR|Error|Warning|WARNING): ")
_FUNCTION_IN_LINE = re.compile(r"([A-Za-z_]\w*)(?=(?:\.[\w.$]+)?\+0x[0-9a-fA-F]+/0x[0-9a-fA-F]+)")
_CORRUPTED_LINE = re.compile(r"^( \[<?(?:0x)?[0-9a-f]+>?\])? should_fail(slab)?(\.[a-z0-9.]+)?\+0x")
_SKIP_LINE = "Disabling lock debugging due to kernel taint"
_REPEATED_HEADER = re.compile(r"(?:BUG|WARNING): .*? (?:in|at) ")
_REPORT_TAIL = ("Kernel panic - not syncing", "WARNING: possible circular locking dependency detected")

# What varies between two reports of one bug, masked in titles: syzkaller's
# dynamicTitleReplacement, each applied until nothing changes.
_REPLACEMENTS = (
    (re.compile(r"syz-executor\.?[0-9]+((/|:)[0-9]+)?"), "syz-executor"),
    (re.compile(r"syzkaller[0-9]+((/|:)[0-9]+)?"), "syzkaller"),
    (re.compile(r"([^a-zA-Z0-9])(?:0x)?[0-9a-f]{6,}"), r"\1ADDR"),
    (re.compile(r"([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})"), "IP"),
    (re.compile(r"(\.\w+)(:[0-9]+)+"), r"\1:LINE"),
    (re.compile(r"([a-zA-Z][a-zA-Z0-9_.]+)\+0x[0-9a-z]+/0x[0-9a-z]+"), r"\1"),
    (re.compile(r"CPU#[0-9]+"), "CPU"),
    (re.compile(r"(\W)(\d+)(\W|$)"), r"\1NUM\3"),
    (re.compile(r"(\d+){7,}"), "NUM"),
    # Not syzkaller's: "on CPU3" (arm64's SError) and a slab report's taint flags, which a
    # warning elsewhere changes, are no part of the bug either.
    (re.compile(r"\bCPU(?:NUM|\d+)\b"), "CPU"),
    (re.compile(r" \((?:Not tainted|Tainted: [^)]*)\)"), ""),
)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\U0010ffff]")
_SPACES = re.compile(r"[ \t]+")

_SKIP = re.compile("|".join(SKIP))


@dataclass(frozen=True, slots=True)
class Description:
    """What a report says of an incident besides its line: title, guilty module, frames."""

    title: str
    module: str | None
    frames: tuple[Frame, ...]
    fingerprint: str


def fingerprint(kind: str, title: str) -> str:
    """16 hex digits from the kind and the title: one bug, one value, on every instance."""
    return hashlib.sha256(f"{kind}\n{title}".encode("utf-8", "backslashreplace")).hexdigest()[:16]


def describe(kind: str, lines: Sequence[str]) -> Description:
    """The title, guilty module and first call trace of an incident.

    `lines` is its window: the trigger line first, then the lines after it as the instance
    sent them (up to WINDOW_LINES are looked at), without or with console time stamps.
    """
    report = _report_lines(list(lines[:WINDOW_LINES]))
    frames = tuple(first_trace(report))
    title, guilty = _title(report)
    title = _sanitize(_mask(title))
    if guilty is None:
        guilty = next((f for f in frames if not _SKIP.search(f.name)), None)
    module = guilty.module if guilty is not None else _banner_module(report[0] if report else "")
    return Description(title, module, frames, fingerprint(kind, title))


def plain(kind: str, line: str) -> Description:
    """A description from the trigger line alone: its text, masked, as the title; no frames."""
    title = _sanitize(_mask(_strip(line)[0]))
    return Description(title, _banner_module(_strip(line)[0]), (), fingerprint(kind, title))


def _strip(text: str) -> tuple[str, str | None]:
    """A line without the console's time stamp and caller id; the caller id."""
    m = _CONSOLE.match(text)
    if m is not None:
        caller = re.search(r"\[\s*([TC]\d+)\]", m.group())
        return text[m.end() :], caller.group(1) if caller else None
    m = _CALLER.match(text)
    if m is not None:
        return text[m.end() :], m.group(1)
    return text, None


def _report_lines(window: list[str]) -> list[str]:
    """The window's lines that belong to the report the first one starts.

    With caller ids, only the trigger's task or CPU (and, after "Sending NMI from CPU", every
    CPU's backtrace); unreliable frames are dropped; the report ends where another one starts.
    """
    if not window:
        return []
    first, context = _strip(window[0])
    tempesta = _TEMPESTA_INCIDENT.match(first) is not None
    report = [first]
    cpu_traceback = False
    # A symbolized report repeats its header once per inlined function: not a new report.
    repeats = _REPEATED_HEADER.match(first)
    for raw in window[1:]:
        text, caller = _strip(raw)
        # Another task's or CPU's lines are not this report's.
        if context is not None and caller != context and not (
            cpu_traceback and caller is not None and caller.startswith("C")
        ):
            continue
        if repeats is not None:
            if text.startswith(repeats.group()):
                report.append(text)
                continue
            repeats = None
        # Without caller ids the console interleaves everyone's lines: the next report's header
        # ends this one. With them the report is the task's (or CPU's) lines, whatever they say.
        if context is None and _starts_report(text, tempesta):
            break
        if any(tail in text for tail in _REPORT_TAIL) and len(report) > _REPORT_MIN_LINES:
            break
        if "Sending NMI from CPU" in text:
            cpu_traceback = True
        if _SKIP_LINE in text or is_questionable(text):
            continue
        report.append(text)
    return report


def _starts_report(text: str, tempesta: bool) -> bool:
    if tempesta and _TEMPESTA_INCIDENT.match(text):
        return True
    for header, _, suppressions in GROUPS:
        if header in text:
            if any(s.search(text) for s in suppressions) or any(i.search(text) for i in REPORT_START_IGNORES):
                continue
            return True
    return False


def _title(report: list[str]) -> tuple[str, Frame | None]:
    """The title before masking, and the guilty frame it names (None when it names none)."""
    if not report:
        return "", None
    first = report[0]
    if _TEMPESTA_INCIDENT.match(first):
        return first, None
    if first.startswith(("sysrq: ", "SysRq : ")):
        # "sysrq: Trigger a crash" is the panic that follows it.
        panic = next((n for n, t in enumerate(report) if "Kernel panic - not syncing" in t), None)
        if panic is None:
            return first, None
        report = report[panic:]
        first = report[0]
    for header, formats, _ in GROUPS:
        if header in first:
            return _from_formats(report, header, formats)
    return first, None


def _from_formats(report: list[str], header: str, formats: Sequence[TitleFormat]) -> tuple[str, Frame | None]:
    text = "\n".join(report) + "\n"
    found = []
    for order, f in enumerate(formats):
        m = f.title.search(text)
        if m is not None:
            found.append((m.start(), order, f, m))
    for _, _, f, m in sorted(found, key=lambda x: (x[0], x[1])):
        if f.report is not None:
            m = f.report.search(text)
            if m is None:
                continue
        groups = [g or "" for g in m.groups()]
        guilty = None
        if f.frame_group is not None:
            guilty = frame_at(text, m.group(f.frame_group), m.end(f.frame_group))
        frame = ""
        if f.stack is not None:
            start = text.count("\n", 0, m.start())
            guilty, frame = _guilty(report[start:], f)
            if guilty is None and (guilty := _header_function(report[start], f)) is not None:
                frame = _canonical(guilty.name)
        return f.text.format(*groups, f=frame), guilty
    line = report[0]
    return line[line.index(header) :], None


def _header_function(line: str, f: TitleFormat) -> Frame | None:
    # No frame in the trace (lost, cut, or not printed): the function the header names, unless
    # it is one that is never guilty.
    found = list(_FUNCTION_IN_LINE.finditer(line))
    if not found:
        return None
    m = found[-1]
    if re.search("|".join(SKIP + f.skip), m.group(1)):
        return None
    return frame_at(line, m.group(1), m.end(1))


def _guilty(lines: list[str], f: TitleFormat) -> tuple[Frame | None, str]:
    """The guilty frame of a report and the name the title gives it ("corrupted" for none)."""
    skip = re.compile("|".join(SKIP + f.skip))
    found = _walk(lines, f.stack, skip, f.extractor)
    if found[0] is None and f.stack2 is not None:
        found = _walk(lines, f.stack2, skip, f.extractor)
    return found


def _walk(lines: list[str], parts: tuple, skip: re.Pattern, extractor) -> tuple[Frame | None, str]:
    """Match the parts in order against the lines (syzkaller's stack formats): a pattern finds
    the next line it matches and its groups are frames; STACK takes every frame until the next
    trace starts (or the next part matches). The first frame of the first stack that survives
    the skip list (or the one the extractor picks) is the guilty one."""
    candidates: list[Frame] = []
    stacks = 0
    i, n = 0, len(lines)
    p = 0
    while p < len(parts) and not (parts[p] is STACK and stacks > 0):
        part = parts[p]
        if part is STACK:
            stacks += 1
            while i < n:
                text = lines[i]
                i += 1
                if _CORRUPTED_LINE.match(text) or STACK_START.search(text):
                    break
                if p + 1 < len(parts) and (m := parts[p + 1].search(text)) is not None:
                    candidates += _frames_of(text, m, skip)
                    p += 1
                    break
                candidates += [f for f in line_frames(text) if not skip.search(f.name)]
        else:
            while i < n:
                text = lines[i]
                i += 1
                if _CORRUPTED_LINE.match(text):
                    break
                m = part.search(text)
                if m is not None:
                    candidates += _frames_of(text, m, skip)
                    break
        p += 1
    return _pick(candidates, extractor)


def _frames_of(text: str, m: re.Match, skip: re.Pattern) -> list[Frame]:
    out = []
    for g in range(1, (m.re.groups or 0) + 1):
        if m.group(g) is not None:
            frame = frame_at(text, m.group(g), m.end(g))
            if not skip.search(frame.name):
                out.append(frame)
    return out


def _pick(candidates: list[Frame], extractor) -> tuple[Frame | None, str]:
    if not candidates:
        return None, "corrupted"
    names = [_canonical(f.name) for f in candidates]
    if extractor is None:
        return candidates[0], names[0]
    index, name = extractor(names)
    if index < 0:
        return None, "corrupted"
    return candidates[index], name or names[index]


def _canonical(name: str) -> str:
    """A syscall's entry point without its prefix (``__x64_sys_connect`` -> ``connect``)."""
    return min((name[len(p) :] for p in STRIP_PREFIXES if name.startswith(p)), key=len, default=name)


def _mask(title: str) -> str:
    for pattern, replacement in _REPLACEMENTS:
        while True:
            masked = pattern.sub(replacement, title)
            if masked == title:
                break
            title = masked
    return title


def _sanitize(title: str) -> str:
    title = _CONTROL.sub("", title[:MAX_TITLE_CHARS].replace("\t", " "))
    return _SPACES.sub(" ", title).strip()


def _banner_module(line: str) -> str | None:
    # A Tempesta FW message names its module in its banner: "[tempesta fw]" is tempesta_fw,
    # "[tempesta tls]" tempesta_tls, "[tdb]" Tempesta DB; older versions' "[tempesta]" is fw.
    m = _TEMPESTA_INCIDENT.match(line)
    if m is None:
        return None
    if m["tdb"]:
        return "tempesta_db"
    return f"tempesta_{m['banner'] or 'fw'}"
