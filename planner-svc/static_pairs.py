"""The ``vllm-pp`` baseline's planner: every instance runs in a static 2-stage pipeline with
half the parameters, formed once as instances come up and never restored.

It has the automatic planner's surface (``start``, ``observe``, ``close``), so the service
drives either. Each look at the loads pairs the first two live solo instances (natural
order) that no reconfiguration holds, through the same coordinator and recorder as every
other drop; a pair that fails is tried again after ``retry_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from kunserve.planner.background_task import OneTaskAtATime
from kunserve.planner.membership import natural_key
from kunserve.planner.reconfiguration_coordinator import ReconfigurationCoordinator
from kunserve.planner.reconfiguration_recorder import ReconfigurationRecorder
from kunserve.protocol import InstanceLoad, Topology

logger = logging.getLogger(__name__)


class StaticPairs(OneTaskAtATime):
    def __init__(self, coordinator: ReconfigurationCoordinator,
                 recorder: ReconfigurationRecorder, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.coordinator = coordinator
        self.recorder = recorder
        self.retry_s = retry_s
        self.clock = clock
        self._not_before = 0.0

    def observe(self, topology: Topology, loads: Mapping[str, InstanceLoad],
                reserved: Mapping) -> None:
        if self.running or self.clock() < self._not_before:
            return
        solo = sorted((info.instance_id for info in topology.instances
                       if info.state == "solo" and info.instance_id in loads
                       and info.instance_id not in self.coordinator.busy), key=natural_key)
        if len(solo) >= 2:
            self.launch(self._pair((solo[0], solo[1])))

    async def _pair(self, members: tuple[str, str]) -> None:
        try:
            reply = await self.recorder.recorded(
                "drop", "static", lambda: self.coordinator.drop(members), members=members,
                figures={"policy": "vllm-pp"})
        except Exception:  # a bug: log it, try again later
            logger.exception("static pairing failed")
            reply = None
        if reply is None or not reply.ok:
            logger.warning("pairing %s failed (%s): retry in %.0f s", "/".join(members),
                           reply.error if reply else "error", self.retry_s)
            self._not_before = self.clock() + self.retry_s
