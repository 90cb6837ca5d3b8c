"""What works less well than it should, and why: the ``degraded`` list of /status.json.

Any component joins by having a ``degraded`` property, a short reason (str) while it is
degraded and None otherwise, and by being watched under a name (spool, archive...). One with
a ``degraded_since`` attribute (epoch seconds) says since when; for the others the first time
the reason is seen counts. Pure code: time is passed in.
"""

from __future__ import annotations

from typing import Any


class Degradations:
    """The components watched for degradation, by name, in the order they were added."""

    def __init__(self) -> None:
        self._components: dict[str, Any] = {}
        self._seen_since: dict[str, float] = {}

    def watch(self, what: str, component: Any) -> None:
        """Report `component`'s ``degraded`` under the name `what` (replaces one of that name)."""
        self._components[what] = component
        self._seen_since.pop(what, None)

    def current(self, now: float) -> list[dict[str, Any]]:
        """``[{"what", "why", "since"}]`` of what is degraded now; since in epoch seconds."""
        found = []
        for what, component in self._components.items():
            try:
                why = component.degraded
            except Exception:
                # A status page must not fail for the component it would describe.
                why = f"cannot tell: {what} failed to say"
            if not why:
                self._seen_since.pop(what, None)
                continue
            since = getattr(component, "degraded_since", None)
            if since is None:
                since = self._seen_since.setdefault(what, now)
            found.append({"what": what, "why": str(why), "since": since})
        return found
