"""The buffers rebuilt from the archive at start: each instance's latest lines, then a marker.

The instances written most recently come first, up to max_instances and RESTORE_SECONDS; each
instance's sequence numbering goes on from its last line, so the first message after the
restart is not counted as a loss. No Twisted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tempesta_ts.archive_files import ArchiveFiles
from tempesta_ts.archive_format import address_of, is_address_name
from tempesta_ts.buffers import BufferRegistry, Instance
from tempesta_ts.netconsole import LogLine

#: The restore at start takes at most about this long (systemd waits 90 s for a start).
RESTORE_SECONDS = 30.0
#: The line put after the lines restored from the archive, in the buffer and so in reports.
RESTART_MARKER = "tempesta-ts: restarted; lines above are from the archive"


@dataclass
class Restored:
    """What a restore did."""

    lines: int = 0
    instances: int = 0
    #: Instances not restored: the time allowed ran out.
    left: int = 0
    seconds: float = 0.0
    #: (file name, reason) of the files that could not be read back.
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def restore(registry: BufferRegistry, files: ArchiveFiles, now: float) -> Restored:
    """Rebuild the registry's buffers from the ends of the archive's files."""
    done = Restored()
    started = time.monotonic()
    max_lines = registry.buffer_max_lines - 1
    max_bytes = registry.buffer_max_bytes - len(RESTART_MARKER)
    if max_lines < 1 or max_bytes < 1:
        return done
    restored: list[Instance] = []
    candidates = files.names()[-registry.max_instances :]
    # The most recently written first: past the time allowed, those written longest ago
    # are the ones that start empty.
    for n, name in enumerate(reversed(candidates)):
        if restored and time.monotonic() - started > RESTORE_SECONDS:
            done.left = len(candidates) - n
            break
        address = address_of(name)
        if registry.get(address) is not None or not is_address_name(address, name):
            continue
        try:
            lines, _ = files.tail(name, max_lines, max_bytes)
        except OSError as e:
            done.unreadable.append((name, e.strerror or str(e)))
            continue
        if lines:
            restored.append(_restore_instance(registry, address, lines, now))
            done.lines += len(lines)
    # The registry's order of activity is the archive's: the most recent dropped last.
    for instance in reversed(restored):
        last_seen = instance.last_seen
        registry.touch(instance.address, now).last_seen = last_seen
    done.instances = len(restored)
    done.seconds = time.monotonic() - started
    return done


def _restore_instance(registry: BufferRegistry, address: str, lines: list[LogLine],
                      now: float) -> Instance:
    instance = registry.touch(address, now)
    instance.buffer.extend(lines)
    instance.buffer.extend([LogLine(now, RESTART_MARKER)])
    instance.first_seen = lines[0].received_at
    instance.last_seen = lines[-1].received_at
    for line in reversed(lines):
        if line.seq is not None:
            # The numbering goes on: the next message is not counted as a loss, a reboot
            # since (numbers from 0, the kernel's clock gone back) is still seen as one.
            instance.decoder.sequence.accept(line.seq, line.kernel_time_us)
            break
    return instance
