"""Title agreement with syzkaller: how often our title is the one syzkaller gives a log.

Runs over syzkaller's report test data (pkg/report/testdata/linux/report/*: each file starts
with ``TITLE: ...`` and other headers, then a blank line, then the console log), finds the first
incident with tempesta_ts.incidents' rules, makes our title from its window (the trigger line
and the lines after it) and compares it with syzkaller's TITLE, exactly. Prints the share that
agree and every mismatch. The files are read where they are, never copied: they are an
acceptance set, not a tuning set.

    python bench/titles.py --git /work/.mirror/google+syzkaller/repo [--commit 1e72964b]
    python bench/titles.py --dir path/to/pkg/report/testdata/linux/report
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tempesta_ts.incidents import Rules  # noqa: E402
from tempesta_ts.netconsole import parse_plain_line  # noqa: E402
from tempesta_ts.titles import WINDOW_LINES, describe  # noqa: E402

REPORTS = "pkg/report/testdata/linux/report"


def from_git(repo: str, commit: str) -> list[tuple[str, bytes]]:
    names = subprocess.run(
        ["git", "-C", repo, "ls-tree", "--name-only", f"{commit}:{REPORTS}"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    out = []
    for name in names:
        data = subprocess.run(["git", "-C", repo, "show", f"{commit}:{REPORTS}/{name}"],
                              check=True, capture_output=True).stdout
        out.append((name, data))
    return out


def from_dir(directory: str) -> list[tuple[str, bytes]]:
    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out.append((name, f.read()))
    return out


def parse(data: bytes) -> tuple[dict[str, str], list[bytes]]:
    """A test file's headers and its log lines (as syzkaller's report_test.go reads them)."""
    lines = data.replace(b"\r", b"").split(b"\n")
    headers: dict[str, str] = {}
    n = 0
    while n < len(lines) and lines[n]:
        key, _, value = lines[n].decode("utf-8", "replace").partition(": ")
        headers.setdefault(key.rstrip(":"), value.strip())
        n += 1
    log = []
    for i in range(n + 1, len(lines)):
        if lines[i] == b"REPORT:" and i > 0 and lines[i - 1] == b"":
            break
        log.append(lines[i])
    return headers, log


def our_title(log: list[bytes], rules: Rules) -> str | None:
    lines = [parse_plain_line(raw, 0.0) for raw in log]
    for i, line in enumerate(lines):
        detection = rules.detect(line.text)
        if detection is not None:
            # Netconsole carries the kernel's lines only: where the console stamped the trigger
            # line, the lines it did not stamp (the fuzzer's own output) are not sent.
            stamped = line.kernel_time_us is not None
            window = [w.text for w in lines[i:] if not stamped or w.kernel_time_us is not None]
            return describe(detection.kind, window[:WINDOW_LINES]).title
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--git", help="a syzkaller git directory (bare or not)")
    source.add_argument("--dir", help="a directory of syzkaller's linux report test files")
    parser.add_argument("--commit", default="HEAD", help="with --git: the commit to read")
    args = parser.parse_args()
    files = from_git(args.git, args.commit) if args.git else from_dir(args.dir)
    rules = Rules()
    total = equal = corrupted = corrupted_equal = 0
    mismatches = []
    for name, data in files:
        headers, log = parse(data)
        expected = headers.get("TITLE")
        if not expected:
            continue
        total += 1
        ours = our_title(log, rules)
        is_corrupted = headers.get("CORRUPTED") == "Y"
        corrupted += is_corrupted
        if ours == expected:
            equal += 1
            corrupted_equal += is_corrupted
        else:
            mismatches.append((name, ours, expected, is_corrupted))
    print(f"{len(files)} files, {total} with a TITLE")
    print(f"same title: {equal}/{total} = {100 * equal / max(total, 1):.1f}%")
    clean = total - corrupted
    print(f"  not marked CORRUPTED: {equal - corrupted_equal}/{clean} = "
          f"{100 * (equal - corrupted_equal) / max(clean, 1):.1f}%")
    print(f"  marked CORRUPTED: {corrupted_equal}/{corrupted}")
    print(f"no incident detected: {sum(1 for m in mismatches if m[1] is None)}")
    print("\nmismatches (file: ours | syzkaller's):")
    for name, ours, expected, is_corrupted in sorted(mismatches, key=lambda m: int(m[0]) if m[0].isdigit() else 0):
        mark = " [corrupted]" if is_corrupted else ""
        print(f"  {name}{mark}: {ours!r} | {expected!r}")


if __name__ == "__main__":
    main()
