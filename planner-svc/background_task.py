"""What the planners that act on their own share: at most one decision running, as a task
the service can cut short (``close``), and the automatic planner's surface (``start``,
``running``) for the ones that keep no state across planner restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


class OneTaskAtATime:
    _running: asyncio.Task | None = None

    async def start(self, topology: object) -> None:
        """Nothing to take back after a planner restart."""

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.done()

    def launch(self, work: Coroutine) -> None:
        self._running = asyncio.create_task(work)

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)
