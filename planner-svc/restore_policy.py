"""When a pipelined group is restored: calm for a window, with hysteresis. Pure and stateful.

A group is calm when its queue is empty (no waiting request, nothing reserved on it) and its
KV demand is below ``usage_fraction`` (default 0.5) of the capacity its members hold solo (the
paper's rule: below half of the no-drop capacity). The window starts at the first calm
observation and restarts whenever the group stops being calm or its demand rises by more than
``rise_tolerance`` (default 0.5) of that threshold above what it was when the window started (a
load climbing towards the next burst). Smaller rises do not restart it: after a burst, requests
keep arriving and finishing, and a window that restarted on every new request was restored
40–90 s after the burst had passed (burst benchmark), serving that long at the pipeline's
per-token cost. A group calm for at least ``window_s`` is ready.

Why this does not flap: a drop needs queued demand that does not fit and usage at the drop
threshold; a restore needs no queue and demand below half of what the members hold solo, so
after a restore each member starts at most half full, well short of another drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kunserve.planner.demand import GroupDemand


@dataclass
class _Window:
    since: float
    demand_tokens: int  # at the start: more than this is rising


class RestorePolicy:
    def __init__(self, window_s: float, usage_fraction: float,
                 rise_tolerance: float = 0.5) -> None:
        self.window_s = window_s
        self.usage_fraction = usage_fraction
        self.rise_tolerance = rise_tolerance
        self._windows: dict[str, _Window] = {}

    def observe(self, now: float, demands: Sequence[GroupDemand],
                solo_tokens: Mapping[str, int]) -> list[GroupDemand]:
        """The groups among ``demands`` (pipelined ones) calm for the window as of ``now``.
        ``solo_tokens``: each instance's KV capacity when solo; a group with a member
        missing there is never ready."""
        windows, ready = {}, []
        for demand in demands:
            threshold = self._threshold(demand, solo_tokens)
            if threshold is None or not self._calm(demand, threshold):
                continue
            window = self._windows.get(demand.group_id)
            rise = self.rise_tolerance * threshold
            if window is None or demand.demand_tokens > window.demand_tokens + rise:
                window = _Window(now, demand.demand_tokens)
            windows[demand.group_id] = window
            if now - window.since >= self.window_s:
                ready.append(demand)
        self._windows = windows
        return ready

    def reset(self) -> None:
        self._windows.clear()

    def _threshold(self, demand: GroupDemand, solo_tokens: Mapping[str, int]) -> float | None:
        """Calm demand stays below this many tokens (None: a member's solo size unknown)."""
        if any(m not in solo_tokens for m in demand.members):
            return None
        return self.usage_fraction * sum(solo_tokens[m] for m in demand.members)

    @staticmethod
    def _calm(demand: GroupDemand, threshold: float) -> bool:
        return (demand.waiting == 0 and demand.queued_blocks == 0
                and demand.demand_tokens < threshold)
