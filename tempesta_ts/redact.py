"""What leaves the site: report_redactions and report_exclude_patterns applied to a report.

The report maker (tempesta_ts/pipeline.py) applies a `Redactor` to each report before it is
handed to the sinks, so the spool, the Support Server and the /reports pages see only what is
sent; the buffers (and what is fed from them: /instances pages, an archive, ClickHouse) keep
the original lines. Pure code: no Twisted, no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

#: What an excluded incident line is replaced with: the incident itself is still reported.
EXCLUDED = "(line excluded by report_exclude_patterns)"


class Redactor:
    """Rewrites (regex, replacement) applied in order to every line a report sends, and the
    regexes of log lines never sent."""

    def __init__(self, redactions: Sequence[tuple[str, str]] = (),
                 excludes: Sequence[str] = ()) -> None:
        self.redactions = [(re.compile(regex), replacement) for regex, replacement in redactions]
        self.excludes = [re.compile(regex) for regex in excludes]

    @classmethod
    def of(cls, config) -> Redactor | None:
        """The configuration's redactor, or None when nothing is to be rewritten or left out."""
        if not config.report_redactions and not config.report_exclude_patterns:
            return None
        return cls(config.report_redactions, config.report_exclude_patterns)

    def excluded(self, line: str) -> bool:
        """Whether a log line is never sent."""
        return any(pattern.search(line) for pattern in self.excludes)

    def line(self, text: str | None) -> str | None:
        """One line with every redaction applied."""
        if text is None:
            return None
        for pattern, replacement in self.redactions:
            text = pattern.sub(replacement, text)
        return text

    def text(self, text: str | None) -> str | None:
        """A multi-line text (system information) redacted line by line, line ends kept."""
        if text is None or not self.redactions:
            return text
        return "".join(self.line(part) for part in text.splitlines(keepends=True))

    def __call__(self, report: dict[str, Any]) -> dict[str, Any]:
        """A copy of a report body (docs/support-api.md) as it may leave the site."""
        out = dict(report)
        log = []
        for entry in report.get("log") or ():
            text = entry.get("text") or ""
            if self.excludes and self.excluded(text):
                continue
            log.append(dict(entry, text=self.line(text)) if self.redactions else entry)
        out["log"] = log
        incidents = []
        for incident in report.get("incidents") or ():
            line = incident.get("line") or ""
            line = EXCLUDED if self.excludes and self.excluded(line) else self.line(line)
            incidents.append(dict(incident, line=line, title=self.line(incident.get("title"))))
        out["incidents"] = incidents
        info = report.get("system_info")
        if info is not None:
            out["system_info"] = dict(info, text=self.text(info.get("text")))
        return out
