"""Call trace frames in kernel log lines: ``tfw_http_resp_fwd+0x2a1/0x2c0 [tempesta_fw]``.

The kernel prints a frame as ``function+offset/size``, the module in brackets when the function
is not in vmlinux: `` foo+0x1/0x2 [mod]`` (x86 and arm64 since 4.x), ``[<ffffffff81234567>]
foo+0x1/0x2`` (x86 before 4.15, with the address), ``[c000000000aed6c0] [c0000000000ae5c0]
foo+0x40/0x100`` (powerpc), ``[<c010cb2c>] (foo) from [<c0109ef8>] (bar+0x10/0x14)`` and
`` foo from bar+0x10/0x14`` (32-bit arm), ``RIP: 0010:foo+0x12/0x34 [mod]`` (the faulting
function on x86; ``pc : foo+0x..`` on arm64, ``PC is at``, ``NIP``, ``EIP``, ``IP:``). A frame
the unwinder is not sure of is printed with ``?`` before it (``unreliable`` after it on powerpc):
it is a stale return address left on the stack, not a caller. Pure code: no Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

#: Most frames the first call trace is given with.
MAX_FRAMES = 32

#: What a frame's function is followed by: the rest of its symbol (``.isra.0``, ``.cold``),
#: offset and size, then the module (``[mod]``, ``[mod <build id>]``) when it has one.
_SYMBOL_TAIL = re.compile(
    r"(?P<suffix>(?:\.[\w.$]+)?)\+(?P<offset>0x[0-9a-fA-F]+)/(?P<size>0x[0-9a-fA-F]+)"
    r"(?:\s+\[(?P<module>[\w.-]+)(?:\s[^\]]*)?\])?"
)
_ADDRESSES = r"(?:\[<?(?:0x)?[0-9a-fA-F]+>?\]\s*){0,2}"
_FRAME = re.compile(r"\s*" + _ADDRESSES + r"\(?(?P<function>[A-Za-z_]\w*)(?=[.+])")
# 32-bit arm: "(callee) from (caller+off/size)", with or without addresses and parentheses.
_ARM_FROM = re.compile(
    r"\s*(?:\[<[0-9a-fA-F]+>\]\s*)?\(?(?P<callee>[A-Za-z_]\w*)[^ ]*? from "
    r"(?:\[<[0-9a-fA-F]+>\]\s*)?\(?(?P<function>[A-Za-z_]\w*)(?=[.+])"
)
_QUESTIONABLE = re.compile(r"\s*(?:\[<?(?:0x)?[0-9a-fA-F]+>?\]\s*)?\? ")
#: The faulting function: x86's RIP/EIP/IP, arm64's pc, old arm's "PC is at", powerpc's NIP.
#: "RIP: 0033:0x7f..." (user space) matches without a function.
RIP = re.compile(
    r"(?:IP|NIP|pc |PC is at):? (?:(?:\d+:)?" + _ADDRESSES + r"(?P<function>[A-Za-z_]\w*)(?=[.+])"
    r"|(?:\d+:)?0x[0-9a-fA-F]+|(?:\d+:)?\[<?(?:0x)?[0-9a-fA-F]+>?\] +\[< *\(null\)>\] +\(null\)"
    r"|\d+: +\(null\))"
)
#: Lines that start a stack trace (syzkaller's stackStartRes).
STACK_START = re.compile(
    r"Call [Tt]race|Allocated:|Allocated by task \d+:|Freed:|Freed by task \d+:"
    r"|[^k] backtrace(?: \(crc [0-9a-fA-F]*\))?:|Backtrace:|Uninit was stored to memory at"
    r"|status: [0-9a-f]{16} badaddr: [0-9a-f]{16} cause: [0-9a-f]{16}"
)
# Lines a call trace may hold besides frames: context tags, symbolized inline frames, the
# registers of an interrupted context.
_IN_TRACE = re.compile(
    r"\s*(?:</?(?:IRQ|TASK|NMI|EOI|SOFTIRQ)>|[\w.]+ \S+:\d+ \[inline\]"
    r"|(?:R[A-Z0-9]{1,2}|E[A-Z]{2}|FS|GS|CS|DS|ES|CR\d|DR\d|PKRU|Code|ORIG_RAX|EFLAGS)\s*:)"
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a call trace, as printed: ``function+offset/size [module]``."""

    function: str
    offset: str | None = None
    size: str | None = None
    module: str | None = None

    @property
    def name(self) -> str:
        """The function without the compiler's suffixes (``.isra.0``, ``.cold``)."""
        return self.function.split(".", 1)[0]

    def as_dict(self) -> dict[str, str | None]:
        """The report's form: function, offset, size, module (None when in vmlinux)."""
        return {"function": self.function, "offset": self.offset, "size": self.size,
                "module": self.module}


def frame_at(text: str, name: str, end: int) -> Frame:
    """The frame whose function `name` ends at `end` in `text`, with what follows it."""
    tail = _SYMBOL_TAIL.match(text, end)
    if tail is None:
        return Frame(name)
    return Frame(name + tail["suffix"], tail["offset"], tail["size"], tail["module"])


def is_questionable(text: str) -> bool:
    """A frame the unwinder is not sure of: `` ? foo+0x1/0x2``, ``... (unreliable)``."""
    return _QUESTIONABLE.match(text) is not None or text.endswith(" (unreliable)")


def line_frames(text: str) -> list[Frame]:
    """The frames a trace line names, callee first (two on 32-bit arm's "from" lines)."""
    m = _ARM_FROM.match(text)
    if m is not None:
        return [frame_at(text, m["callee"], m.end("callee")),
                frame_at(text, m["function"], m.end("function"))]
    m = _FRAME.match(text)
    if m is None or _SYMBOL_TAIL.match(text, m.end("function")) is None:
        return []
    return [frame_at(text, m["function"], m.end("function"))]


def rip_frame(text: str) -> Frame | None:
    """The faulting function of a ``RIP:``/``pc :``/``PC is at`` line, None for user space."""
    m = RIP.search(text)
    if m is None or m["function"] is None:
        return None
    return frame_at(text, m["function"], m.end("function"))


def first_trace(lines: Iterable[str]) -> list[Frame]:
    """The first call trace: the faulting function (when printed before it), then its frames.

    Unreliable (``?``) frames are left out: they are leftovers on the stack, not callers. A
    trace ends at the first line after its frames that is neither a frame, a context tag, an
    inline frame nor the registers of an interrupted context. At most MAX_FRAMES.
    """
    frames: list[Frame] = []
    rip: Frame | None = None
    in_trace = False
    for n, text in enumerate(lines):
        if not in_trace:
            if STACK_START.search(text):
                in_trace = True
                continue
            # KMSAN prints the frames right under its header with no "Call Trace:", 32-bit arm
            # before 4.x its "(callee) from (caller)" lines.
            if not (n == 1 and not is_questionable(text) and line_frames(text)) and not (
                _ARM_FROM.match(text) and not is_questionable(text)
            ):
                if rip is None:
                    rip = rip_frame(text)
                continue
            in_trace = True
        if is_questionable(text):
            continue
        found = line_frames(text)
        if found:
            # 32-bit arm names each caller twice: as one line's caller, the next one's callee.
            if frames and len(found) == 2 and found[0].name == frames[-1].name:
                found = found[1:]
            frames.extend(found)
        elif (inner := rip_frame(text)) is not None:
            frames.append(inner)
        elif frames:
            if _IN_TRACE.match(text) is None:
                break
        elif text.strip() and _IN_TRACE.match(text) is None:
            # A marker with no frames under it: look for the next trace.
            in_trace = False
        if len(frames) >= MAX_FRAMES:
            break
    if rip is not None:
        frames.insert(0, rip)
    return frames[:MAX_FRAMES]
