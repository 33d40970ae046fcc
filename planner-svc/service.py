"""The planner process: every ``topology_poll_interval`` seconds, read the live loads, ask the
pure membership rules for the next topology, and publish it if there is one, then hand the
loads to the automatic planner (``auto_planner.py``: drop on overload, restore when calm);
meanwhile answer ``Reconfigure`` requests on ``Subjects.RECONFIGURE`` through the coordinator.
Every reconfiguration, admin or automatic, is recorded (``reconfiguration_recorder.py``).

This is where the planner meets Redis and NATS (through ``LoadReader``, ``TopologyPublisher``
and ``ControlChannel``) and hosts the rendezvous TCPStore; decisions live in pure modules
(``membership.py``, ``group_transitions.py``, ``reconfigure_validation.py``,
``auto_policy.py``). Redis or NATS trouble is logged and retried on the next poll; the loop
ends when ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from redis.asyncio import Redis

from kunserve.ledger import PlanLedger
from kunserve.planner.auto_planner import AutoPlanner
from kunserve.planner.auto_policy import AutoPolicy
from kunserve.planner.control_channel import ControlChannel
from kunserve.planner.load_reader import LoadReader
from kunserve.planner.membership import Membership
from kunserve.planner.migrator import Migrator
from kunserve.planner.reconfiguration_coordinator import (
    UNAVAILABLE,
    PhaseTimeouts,
    ReconfigurationCoordinator,
)
from kunserve.planner.reconfiguration_recorder import ReconfigurationRecorder
from kunserve.planner.reconfigure_validation import BAD_REQUEST
from kunserve.planner.settings import PlannerSettings
from kunserve.planner.static_pairs import StaticPairs
from kunserve.planner.topology_publisher import TRANSIENT_ERRORS, TopologyPublisher
from kunserve.policies import get_policy
from kunserve.protocol import (
    Reconfigure,
    ReconfigureReply,
    Subjects,
    Topology,
    decode,
    encode,
    subscriptions_in_place,
)
from kunserve.telemetry import setup_tracing

logger = logging.getLogger(__name__)


class PlannerService:
    def __init__(self, reader: LoadReader, publisher: TopologyPublisher, membership: Membership,
                 coordinator: ReconfigurationCoordinator, nats: NATS,
                 poll_interval: float = 0.1, recorder: ReconfigurationRecorder | None = None,
                 auto: AutoPlanner | None = None) -> None:
        self.reader = reader
        self.publisher = publisher
        self.membership = membership
        self.coordinator = coordinator
        self.nats = nats
        self.poll_interval = poll_interval
        self.recorder = recorder or ReconfigurationRecorder(publisher)
        self.auto = auto
        self._requests: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        topology = await self.publisher.load_stored()
        if self.auto is not None:
            await self.auto.start(topology)
        subscription = await self.nats.subscribe(Subjects.RECONFIGURE, cb=self._on_reconfigure)
        await subscriptions_in_place(self.nats)
        logger.info("planner up: topology epoch %d, %d instances, automatic planning: %s",
                    topology.epoch, len(topology.instances),
                    type(self.auto).__name__ if self.auto is not None else "off")
        try:
            await self._poll_until(stop)
        finally:
            await subscription.unsubscribe()
            for task in self._requests:  # a reconfiguration cut short: see membership's rules
                task.cancel()
            await asyncio.gather(*self._requests, return_exceptions=True)
            if self.auto is not None:
                await self.auto.close()

    async def poll_once(self) -> Topology | None:
        """Publish the next topology if membership changed, then let the automatic planner
        look at the same loads; return the published topology (None: no change)."""
        loads, reserved = await self.reader.live_figures()
        published = await self.publisher.update(
            lambda current: self.membership.next_topology(current, loads, self.coordinator.busy))
        if self.auto is not None:
            self.auto.observe(self.publisher.current, loads, reserved)
        return published

    async def answer(self, data: bytes) -> ReconfigureReply:
        """The reply to one ``Reconfigure`` request."""
        try:
            request = decode(data, Reconfigure)
        except msgspec.DecodeError as exc:
            return ReconfigureReply(ok=False, status=BAD_REQUEST,
                                    error=f"unreadable Reconfigure: {exc}")
        try:
            return await self.recorder.recorded(
                request.action, "admin", lambda: self.coordinator.reconfigure(request),
                members=request.instances,
                figures={"instances": request.instances, "group": request.group})
        except TRANSIENT_ERRORS as exc:
            logger.warning("reconfiguration %s failed: %r", request, exc)
            return ReconfigureReply(ok=False, status=UNAVAILABLE,
                                    error=f"the planner lost Redis or NATS: {exc!r}")

    async def _poll_until(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self.poll_once()
                failing = False
            except TRANSIENT_ERRORS as exc:
                if not failing:  # one line per outage, not one per poll
                    logger.warning("planner poll failed, retrying: %r", exc)
                failing = True
            await _sleep_unless(stop, self.poll_interval)

    async def _on_reconfigure(self, msg: Msg) -> None:
        # a task per request: a reconfiguration takes seconds, others must not wait behind it
        task = asyncio.create_task(self._respond(msg))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _respond(self, msg: Msg) -> None:
        try:
            reply = await self.answer(msg.data)
        except Exception as exc:  # a bug: the requester still gets an answer, not a timeout
            logger.exception("reconfiguration failed")
            reply = ReconfigureReply(ok=False, status=500, error=f"planner error: {exc!r}")
        try:
            await msg.respond(encode(reply))
        except TRANSIENT_ERRORS as exc:
            logger.warning("could not answer a reconfiguration (%r): %s", exc, reply)


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
    """Connect, host the rendezvous store, run until ``stop``, disconnect."""
    from kunserve.planner.rendezvous_store import RendezvousStore  # imports torch

    num_layers = layer_count(settings.model)
    store = RendezvousStore(settings.store_host)
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    nc = await nats.connect(settings.nats_url, name="kunserve-planner",
                            max_reconnect_attempts=-1)
    provider = setup_tracing("kunserve-planner", settings.otel_exporter, settings.otel_endpoint)
    publisher = TopologyPublisher(redis, nc, tracer=provider.get_tracer("kunserve.planner"))
    timeouts = PhaseTimeouts(prepare_s=settings.prepare_timeout,
                             commit_s=settings.commit_timeout,
                             restore_s=settings.restore_timeout)
    coordinator = ReconfigurationCoordinator(ControlChannel(nc), publisher, store.address,
                                             num_layers, timeouts)
    ledger = await _open_ledger(settings.database_url)
    recorder = ReconfigurationRecorder(publisher, redis, ledger,
                                       provider.get_tracer("kunserve.planner"))
    policy = get_policy(settings.policy)
    auto: AutoPlanner | StaticPairs | Migrator | None = None
    if policy.static_pairs:
        auto = StaticPairs(coordinator, recorder)
    elif policy.migrate:
        auto = Migrator(coordinator, recorder)
    elif policy.auto_drop and settings.auto_drop:
        auto = AutoPlanner(AutoPolicy(settings.auto_settings(), num_layers), coordinator,
                           recorder, redis)
    logger.info("policy %s", policy.name)
    service = PlannerService(LoadReader(redis), publisher, Membership(num_layers), coordinator,
                             nc, settings.topology_poll_interval, recorder, auto)
    logger.info("rendezvous store at %s:%d", store.address.host, store.address.port)
    try:
        await service.run(stop)
    finally:
        await nc.drain()
        await redis.aclose()
        if ledger is not None:
            await ledger.close()
        provider.shutdown()


async def _open_ledger(url: str | None) -> PlanLedger | None:
    """The ledger's ``plans`` writer; None (logged) when none is configured or it cannot be
    opened: the planner plans without it."""
    if not url:
        logger.info("no KUNSERVE_DATABASE_URL: reconfigurations are not kept in a ledger")
        return None
    ledger = PlanLedger(url)
    try:
        await ledger.start()
    except Exception as exc:
        logger.warning("cannot open the ledger (%r): reconfigurations are not kept", exc)
        await ledger.close()
        return None
    return ledger
