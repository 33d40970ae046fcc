"""The ``llumnix`` baseline's planner: migrate running requests from the instance short of KV
to the one with room (``migration_policy.py``), one migration at a time, through the
coordinator (a 2-member link; the topology does not change), each one recorded as every
reconfiguration is (a span, a ledger row, ``kunserve:migrations_total``).

It has the automatic planner's surface (``start``, ``observe``, ``close``), so the service
drives either. After each migration it waits ``interval_s``, so the loads it decides on next
show the move; after one that moved nothing (the requests it picked ended during the copy)
it looks again at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from kunserve.planner.background_task import OneTaskAtATime
from kunserve.planner.migration_policy import Migration, decide_migration
from kunserve.planner.reconfiguration_coordinator import ReconfigurationCoordinator
from kunserve.planner.reconfiguration_recorder import ReconfigurationRecorder
from kunserve.protocol import InstanceLoad, Topology

logger = logging.getLogger(__name__)


class Migrator(OneTaskAtATime):
    def __init__(self, coordinator: ReconfigurationCoordinator,
                 recorder: ReconfigurationRecorder | None = None, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.coordinator = coordinator
        self.recorder = recorder
        self.interval_s = interval_s
        self.clock = clock
        self.migrations = 0  # succeeded so far
        self._not_before = 0.0

    def observe(self, topology: Topology, loads: Mapping[str, InstanceLoad],
                reserved: Mapping) -> None:
        if self.running or self.clock() < self._not_before:
            return
        migration = decide_migration(topology, loads, self.coordinator.busy)
        if migration is not None:
            self.launch(self._migrate(migration))

    async def _migrate(self, migration: Migration) -> None:
        try:
            def run():
                return self.coordinator.migrate(migration.source, migration.destination,
                                                migration.blocks)
            reply = await (run() if self.recorder is None else self.recorder.recorded(
                "migration", "auto", run, members=[migration.source, migration.destination],
                figures={"blocks": migration.blocks}))
        except Exception:  # a bug: log it, keep balancing
            logger.exception("migration failed")
            reply = None
        if reply is not None and reply.ok:
            self.migrations += 1
            logger.info("migrated %d request(s) (up to %d blocks) %s -> %s (%.2f s)",
                        reply.moved_requests, migration.blocks, migration.source,
                        migration.destination, sum(reply.phase_seconds.values()))
        else:
            logger.warning("migration %s -> %s failed: %s", migration.source,
                           migration.destination, reply.error if reply else "error")
        if reply is not None and reply.ok and reply.moved_requests == 0:
            return  # the requests picked ended meanwhile: nothing to wait for, look again
        self._not_before = self.clock() + self.interval_s
