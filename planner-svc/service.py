"""The planner process: every ``topology_poll_interval`` seconds, read the live loads, ask the
pure decision code for the next topology, and publish it if there is one.

This is the only planner code that talks to Redis and NATS (through ``LoadReader`` and
``TopologyPublisher``); decisions live in pure modules such as ``membership.py``. Redis or
NATS trouble is logged and retried on the next poll; the loop ends when ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.errors import Error as NatsError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.planner.load_reader import LoadReader
from kunserve.planner.membership import next_topology
from kunserve.planner.settings import PlannerSettings
from kunserve.planner.topology_publisher import TopologyPublisher
from kunserve.protocol import Topology
from kunserve.telemetry import setup_tracing

logger = logging.getLogger(__name__)

_TRANSIENT = (RedisError, NatsError, OSError, asyncio.TimeoutError)


class PlannerService:
    def __init__(self, reader: LoadReader, publisher: TopologyPublisher, num_layers: int,
                 poll_interval: float = 0.1, tracer=None) -> None:
        self.reader = reader
        self.publisher = publisher
        self.num_layers = num_layers
        self.poll_interval = poll_interval
        self.tracer = tracer
        self.topology = Topology()

    async def run(self, stop: asyncio.Event) -> None:
        self.topology = await self.publisher.stored()
        logger.info("planner up: topology epoch %d, %d instances", self.topology.epoch,
                    len(self.topology.instances))
        failing = False
        while not stop.is_set():
            try:
                await self.poll_once()
                failing = False
            except _TRANSIENT as exc:
                if not failing:  # one line per outage, not one per poll
                    logger.warning("planner poll failed, retrying: %r", exc)
                failing = True
            await _sleep_unless(stop, self.poll_interval)

    async def poll_once(self) -> Topology | None:
        """Publish the next topology if the live set changed; return it (None: no change)."""
        loads = await self.reader.live_loads()
        topology = next_topology(self.topology, loads.keys(), self.num_layers)
        if topology is None:
            return None
        await self._publish(topology)
        return topology

    async def _publish(self, topology: Topology) -> None:
        ids = [info.instance_id for info in topology.instances]
        if self.tracer is None:
            await self.publisher.publish(topology)
        else:
            with self.tracer.start_as_current_span("planner.topology") as span:
                span.set_attribute("kunserve.epoch", topology.epoch)
                span.set_attribute("kunserve.instances", ids)
                await self.publisher.publish(topology)
        self.topology = topology
        logger.info("topology epoch %d: %s", topology.epoch, ", ".join(ids) or "no instances")


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


def layer_count(model: str | None) -> int:
    """The model's decoder layers (0 when no model is configured)."""
    if not model:
        logger.warning("KUNSERVE_MODEL not set: topology layer ranges are left at 0")
        return 0
    from kunserve.worker.model_config import ModelConfig

    return ModelConfig.from_dir(model).num_layers


async def serve(settings: PlannerSettings, stop: asyncio.Event) -> None:
    """Connect, run until ``stop``, disconnect."""
    num_layers = layer_count(settings.model)
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    nc = await nats.connect(settings.nats_url, name="kunserve-planner",
                            max_reconnect_attempts=-1)
    provider = setup_tracing("kunserve-planner", settings.otel_exporter, settings.otel_endpoint)
    service = PlannerService(LoadReader(redis), TopologyPublisher(redis, nc), num_layers,
                             settings.topology_poll_interval,
                             tracer=provider.get_tracer("kunserve.planner"))
    try:
        await service.run(stop)
    finally:
        await nc.drain()
        await redis.aclose()
        provider.shutdown()
