"""When a drop is due: a group overloaded continuously for a window. Pure and stateful.

A group is overloaded when its queued demand does not fit its free KV blocks and its usage is
at least ``usage_threshold`` (``GroupDemand.overloaded``). ``observe`` is called with every
load the planner reads (every ``topology_poll_interval``); a group counts as overloaded for
the window when every observation since the first overloaded one said so and that one is at
least ``window_s`` old. So the decision comes at the first read after the window has elapsed:
at most one poll interval late. One observation without overload (or without a confirmed
load) starts the window again.
"""

from __future__ import annotations

from collections.abc import Sequence

from kunserve.planner.demand import GroupDemand


class OverloadDetector:
    def __init__(self, window_s: float, usage_threshold: float) -> None:
        self.window_s = window_s
        self.usage_threshold = usage_threshold
        self._since: dict[str, float] = {}  # group -> first observation of its overload

    def observe(self, now: float, demands: Sequence[GroupDemand]) -> list[GroupDemand]:
        """The groups among ``demands`` overloaded for at least the window, as of ``now``."""
        overloaded = [d for d in demands if d.overloaded(self.usage_threshold)]
        self._since = {d.group_id: self._since.get(d.group_id, now) for d in overloaded}
        return [d for d in overloaded if now - self._since[d.group_id] >= self.window_s]

    def reset(self) -> None:
        """Forget every window (the topology changed under them)."""
        self._since.clear()
