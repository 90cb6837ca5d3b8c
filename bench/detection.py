"""Detection measured on console logs this project did not write: syzkaller's report test data.

Each file of syzkaller's pkg/report/testdata/linux/report/ is a console log with the title
syzkaller gives it in a ``TITLE:`` header (none: syzkaller finds no crash in it). Every line is
sent through the server's own path, as a plain netconsole datagram: the decoder, the hot path's
line filter, then the incident rules. Printed:

- recall: of the logs with a kernel failure (a non-empty TITLE, less the titles of syzkaller's
  own programs, below), how many raise an incident;
- right kind: of those, how many have a first incident of the kind the title names (KIND_OF);
- false incidents: of the logs without a TITLE, how many raise one;
- the same recall and right kind on pkg/report/testdata/linux/guilty/ (reports cut to the crash,
  a ``FILE:`` header instead of a title: every one a failure, its kind not given, so recall only).

    python bench/detection.py /path/to/syzkaller/pkg/report/testdata/linux [--list]

With --list, the files missed, of the wrong kind and falsely raised are named. syzkaller's data
is an acceptance set: read its figures, do not tune the rules on its files
(docs/incidents.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tempesta_ts.buffers import BufferRegistry  # noqa: E402
from tempesta_ts.incidents import Rules  # noqa: E402

#: syzkaller title prefix -> the kind a first incident must have, first match wins. The kinds
#: follow the word the kernel prints: a panic is a crash; a fault the kernel dies of (x86's
#: "BUG: unable to handle ...", arm's "Unable to handle ...", general protection, divide
#: error, invalid opcode, "Internal error") an oops; BUG, KASAN and the other sanitizers,
#: kernel BUG, memory leaks, hung tasks, RCU stalls and reference leaks a bug; WARNING,
#: lockdep's deadlock reports and the other INFO reports a warning.
KIND_OF = (
    ("kernel panic", "crash"),
    ("kernel stack overflow", "crash"),
    ("PANIC: ", "crash"),
    ("BUG: unable to handle", "oops"),
    ("unable to handle", "oops"),
    ("general protection fault", "oops"),
    ("stack segment fault", "oops"),
    ("divide error", "oops"),
    ("invalid opcode", "oops"),
    ("int3", "oops"),
    ("Internal error", "oops"),
    ("Unhandled fault", "oops"),
    ("Alignment trap", "oops"),
    ("Oops", "oops"),
    ("BUG", "bug"),
    ("KASAN", "bug"),
    ("KMSAN", "bug"),
    ("KCSAN", "bug"),
    ("KFENCE", "bug"),
    ("UBSAN", "bug"),
    ("kernel BUG", "bug"),
    ("memory leak", "bug"),
    ("INFO: task hung", "bug"),
    ("INFO: task can't die", "bug"),
    ("INFO: rcu detected stall", "bug"),
    ("unregister_netdevice", "bug"),
    ("VFS: ", "bug"),
    ("WARNING", "warning"),
    ("possible deadlock", "warning"),
    ("inconsistent lock state", "warning"),
    ("INFO: ", "warning"),
)

#: Titles syzkaller gives to what its own programs or user space print ("SYZFAIL:", Go's
#: "panic:"), to a reboot it sees, or to a missing console: no kernel failure on the console.
NOT_KERNEL = re.compile(
    r"^(?:SYZFAIL|SYZFATAL|go runtime error|panic:|lost connection|no output|unexpected kernel"
    r" reboot|suppressed report|executor failed|trusty: |fatal error)"
)


def kind_of(title: str) -> str | None:
    """The incident kind a syzkaller title names; None for a title with no kernel failure."""
    if NOT_KERNEL.match(title):
        return None
    for prefix, kind in KIND_OF:
        if title.startswith(prefix):
            return kind
    return "bug"


def read_test(path: str) -> tuple[dict[str, str], list[bytes]]:
    """A syzkaller test file's headers and its console log's lines (without REPORT:)."""
    with open(path, "rb") as f:
        data = f.read().replace(b"\r", b"")
    lines = data.split(b"\n")
    headers: dict[str, str] = {}
    while lines and lines[0]:
        key, _, value = lines.pop(0).decode("utf-8", "replace").partition(": ")
        headers.setdefault(key, value)
    log: list[bytes] = []
    previous_empty = True
    for line in lines[1:]:
        if previous_empty and line == b"REPORT:":
            break
        log.append(line)
        previous_empty = not line
    return headers, log


def first_incident(log: list[bytes]) -> tuple[str, str] | None:
    """(kind, line) of the first incident the server raises on this console log, sent a line
    a datagram as plain netconsole, through the decoder and the hot path's line filter."""
    rules = Rules()
    found: list[tuple[str, str]] = []

    def look(instance, lines) -> None:
        for line in lines:
            detection = rules.detect(line.text)
            if detection is not None and not found:
                found.append((detection.kind, line.text))

    registry = BufferRegistry(10, 100, 1_000_000, observers=[look], line_filter=rules.line_filter)
    for line in log:
        if line.strip():
            registry.receive_datagram("192.0.2.1", line + b"\n", 1.0)
        if found:
            break
    registry.flush(2.0)
    return found[0] if found else None


def measure(directory: str, with_titles: bool) -> dict[str, list[str]]:
    """Files of a test data directory sorted into outcomes."""
    out: dict[str, list[str]] = {
        "failure": [], "raised": [], "right": [], "healthy": [], "false": [], "not-kernel": []
    }
    for name in sorted(os.listdir(directory), key=lambda n: (len(n), n)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        headers, log = read_test(path)
        incident = first_incident(log)
        title = headers.get("TITLE", "") if with_titles else "(guilty)"
        if not title:
            out["healthy"].append(name)
            if incident is not None:
                out["false"].append(f"{name}: {incident[1][:100]}")
            continue
        expected = kind_of(title) if with_titles else None
        if with_titles and expected is None:
            out["not-kernel"].append(f"{name}: {title}")
            continue
        out["failure"].append(name)
        if headers.get("CORRUPTED") != "Y":
            out.setdefault("whole", []).append(name)
        if incident is None:
            if headers.get("CORRUPTED") != "Y":
                out.setdefault("whole-missed", []).append(name)
            out.setdefault("missed", []).append(f"{name}: {title}")
            continue
        out["raised"].append(name)
        if expected is None or incident[0] == expected:
            out["right"].append(name)
        else:
            out.setdefault("wrong", []).append(
                f"{name}: {title!r} wants {expected}, got {incident[0]}: {incident[1][:80]}"
            )
    return out


def percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f} %)" if whole else "0/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("testdata", help="syzkaller's pkg/report/testdata/linux directory")
    parser.add_argument("--list", action="store_true", help="name the files that went wrong")
    args = parser.parse_args()
    report = os.path.join(args.testdata, "report")
    r = measure(report, with_titles=True)
    print(f"{report}:")
    print(f"  failure logs (non-empty TITLE): {len(r['failure']) + len(r['not-kernel'])},"
          f" of which {len(r['not-kernel'])} name no kernel failure and are left out")
    print(f"  recall:          {percent(len(r['raised']), len(r['failure']))}")
    whole = len(r.get("whole", []))
    print(f"  recall on the logs syzkaller does not mark CORRUPTED: "
          f"{percent(whole - len(r.get('whole-missed', [])), whole)}")
    print(f"  right kind:      {percent(len(r['right']), len(r['failure']))}"
          f" (of those raised: {percent(len(r['right']), len(r['raised']))})")
    print(f"  false incidents: {percent(len(r['false']), len(r['healthy']))} of logs without TITLE")
    guilty = os.path.join(args.testdata, "guilty")
    g = measure(guilty, with_titles=False) if os.path.isdir(guilty) else None
    if g is not None:
        print(f"{guilty}:")
        print(f"  recall:          {percent(len(g['raised']), len(g['failure']))}")
    if args.list:
        for label, key in (("missed", "missed"), ("wrong kind", "wrong"),
                           ("false incident", "false"), ("left out", "not-kernel")):
            for entry in r.get(key, []):
                print(f"{label}: {entry}")
        for entry in (g or {}).get("missed", []):
            print(f"missed (guilty): {entry}")


if __name__ == "__main__":
    main()
