"""The router service: takes ``GenerateRequest``s off NATS and dispatches each to one instance.

Several routers share ``Subjects.GENERATE`` through the queue group ``Subjects.ROUTER_QUEUE``.
For each request: list the candidates (registered instances, minus non-leader pipeline stages
and instances that just had no listener), reserve capacity on the best live one atomically
(``reservations.py``), forward the request with ``instance_id`` filled in to
``Subjects.worker_generate(id)`` as a NATS request, and wait for the worker's receipt (an
empty reply; a non-empty one means it refused, e.g. while draining). When the chosen worker
has no listener or refuses, its reservation is released and the next best one is tried.
When no instance is live (or Redis is unreachable), a finished ``RequestUpdate`` with the
error ``no live worker instance`` (or ``REDIS_ERROR``) and ``instance_id == ""`` goes to the
request's updates subject.

If the GENERATE message has a reply subject, the router answers it with the chosen instance
id (empty when none), so a publisher can tell "no router" (NATS no-responders) from the rest.

The listing behind the candidates (the registered instances and the topology) is kept for
``listing_ttl_ms`` rather than read per request: that read was one of the two Redis round
trips in front of every dispatch. It is read again at once when the planner publishes a
topology, when it is empty, and when none of its instances is live; liveness itself is always
checked in the reserve script, so a stale listing can only miss an instance that registered
in the meantime, for at most ``listing_ttl_ms``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec
import nats
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.exceptions import RedisError

from kunserve.protocol import (
    GenerateRequest,
    RedisKeys,
    RequestUpdate,
    Subjects,
    Topology,
    decode,
    encode,
    subscriptions_in_place,
)
from kunserve.reservations import Reservations, reservation_tokens
from kunserve.router.load_balancer import dispatch_order
from kunserve.router.settings import RouterSettings
from kunserve.telemetry import extract_context, inject_headers, request_tracer, setup_tracing

logger = logging.getLogger(__name__)

NO_INSTANCE_ERROR = "no live worker instance"
REDIS_ERROR = "the router cannot reach Redis (instance loads)"
# how long an instance that had no NATS listener is skipped (its load key may outlive it)
UNREACHABLE_BACKOFF_S = 2.0


class Router:
    def __init__(self, settings: RouterSettings, span_exporter: SpanExporter | None = None):
        self.settings = settings
        self._tracing = setup_tracing("kunserve-router", settings.otel_exporter,
                                      settings.otel_endpoint, span_exporter)
        self._owns_exporters = span_exporter is None
        self._tracer = request_tracer(self._tracing, "kunserve.router", settings.otel_exporter,
                                      span_exporter)
        self.nc: nats.NATS | None = None
        self.redis: aioredis.Redis | None = None
        self.reservations: Reservations | None = None
        self._subscription = None
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._tasks: set[asyncio.Task] = set()
        self._unreachable: dict[str, float] = {}  # instance id -> monotonic time to retry
        self._listing: _Listing | None = None
        self._stopping = False
        self.connection_lost = asyncio.Event()  # NATS gave up reconnecting: the process exits

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        # one connection for the reserve calls, one at a time: from a pool, each call would
        # pay a checkout (locks and a health-check read, ~0.2 ms of Python here) longer than
        # the call itself; the listing's pipeline still takes a pooled connection
        self.redis = aioredis.from_url(self.settings.redis_url, single_connection_client=True)
        await self.redis.ping()  # a wrong URL fails the start, not every dispatch
        self.reservations = Reservations(self.redis, self.settings.reservation_ttl_ms)
        self.nc = await nats.connect(self.settings.nats_url, name="kunserve-router",
                                     error_cb=log_nats_error, closed_cb=self._on_nats_closed)
        await self.nc.subscribe(Subjects.TOPOLOGY, cb=self._on_topology)
        self._subscription = await self.nc.subscribe(
            Subjects.GENERATE, queue=Subjects.ROUTER_QUEUE, cb=self._on_message)
        await subscriptions_in_place(self.nc)  # started: a request sent now is routed
        logger.info("router consuming %s (queue %s)", Subjects.GENERATE, Subjects.ROUTER_QUEUE)

    async def stop(self) -> None:
        """Stop taking requests, finish dispatching the ones taken, close connections."""
        self._stopping = True
        if self._subscription is not None and self.nc.is_connected:
            await self._subscription.drain()  # what NATS already handed us is still routed
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.nc is not None:
            if self.nc.is_connected:
                await self.nc.drain()
            await self.nc.close()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        self._tracing.force_flush()
        if self._owns_exporters:
            self._tracing.shutdown()

    async def _on_nats_closed(self) -> None:
        if not self._stopping:
            logger.error("lost NATS for good; stopping")
            self.connection_lost.set()

    # -- handling ----------------------------------------------------------------------------
    async def _on_message(self, msg: Msg) -> None:
        # the subscription awaits this callback message by message: hand off, return at once
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.error("dispatch failed", exc_info=task.exception())

    async def _handle(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, GenerateRequest)
        except msgspec.DecodeError as exc:  # includes ValidationError
            logger.warning("dropped a malformed GenerateRequest: %s", exc)
            return
        context = extract_context(msg.headers)
        with self._tracer.start_as_current_span("router.dispatch", context=context,
                                                kind=SpanKind.CONSUMER) as span:
            span.set_attribute("kunserve.request_id", request.request_id)
            error = NO_INSTANCE_ERROR
            try:
                instance_id = await self.dispatch(request, msg.headers)
            except RedisError as exc:
                logger.error("cannot reach Redis: %s", exc)
                instance_id, error = None, REDIS_ERROR
            span.set_attribute("kunserve.instance_id", instance_id or "")
            if instance_id is None:
                span.set_status(Status(StatusCode.ERROR, error))
                await self._publish_failure(request, error)
        if msg.reply:
            await msg.respond((instance_id or "").encode())

    async def dispatch(self, request: GenerateRequest,
                       headers: dict[str, str] | None = None) -> str | None:
        """Reserve capacity on the best live instance and hand it the request; the instance
        id, or None when no live instance took it."""
        tokens = reservation_tokens(len(request.prompt_token_ids), request.sampling.max_tokens)
        for _ in range(self.settings.max_attempts):
            instance_id = await self._reserve(tokens)
            if instance_id is None:
                return None
            if await self._forward(request, instance_id, headers):
                return instance_id
            await self.reservations.release(instance_id, tokens)
            self._unreachable[instance_id] = time.monotonic() + UNREACHABLE_BACKOFF_S
        return None

    async def _reserve(self, tokens: int) -> str | None:
        kept = self._listing is not None
        instance_id = await self.reservations.reserve(await self.candidates(), tokens)
        if instance_id is None and kept:  # none of the kept ones is live: any new ones?
            instance_id = await self.reservations.reserve(await self.candidates(fresh=True),
                                                          tokens)
        return instance_id

    async def candidates(self, fresh: bool = False) -> list[str]:
        """Instances the router may dispatch to (liveness is checked in the reserve script).
        ``fresh``: read the listing from Redis even if the kept one is young enough."""
        listing = self._listing
        if fresh or listing is None or listing.expired(self.settings.listing_ttl_ms / 1000):
            listing = await self._read_listing()
        now = time.monotonic()
        self._unreachable = {i: t for i, t in self._unreachable.items() if t > now}
        return dispatch_order(listing.instance_ids, listing.topology,
                              exclude=list(self._unreachable))

    async def _read_listing(self) -> _Listing:
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(RedisKeys.INSTANCES)
        pipe.get(RedisKeys.TOPOLOGY)
        members, raw_topology = await pipe.execute()
        ids = [m.decode() if isinstance(m, bytes) else m for m in members]
        listing = _Listing(ids, _read_topology(raw_topology), time.monotonic())
        self._listing = listing if ids else None  # no instance yet: look again next time
        return listing

    async def _on_topology(self, msg: Msg) -> None:
        self._listing = None  # the planner changed it (the key is written before the message)

    async def _forward(self, request: GenerateRequest, instance_id: str,
                       headers: dict[str, str] | None) -> bool:
        """Send the request to the instance; False only when nobody listens there."""
        forwarded = msgspec.structs.replace(request, instance_id=instance_id)
        try:
            receipt = await self.nc.request(
                Subjects.worker_generate(instance_id), encode(forwarded),
                timeout=self.settings.dispatch_timeout_ms / 1000, headers=inject_headers(headers))
        except NoRespondersError:
            logger.warning("instance %s has no listener; trying another", instance_id)
            return False
        except NatsTimeoutError:
            # it may still have got the request: resending elsewhere could run it twice
            logger.warning("instance %s did not confirm request %s in time",
                           instance_id, request.request_id)
            return True
        if receipt.data:  # the worker refused it (it is draining)
            logger.info("instance %s refused request %s: %s", instance_id, request.request_id,
                        receipt.data.decode(errors="replace"))
            return False
        return True

    async def _publish_failure(self, request: GenerateRequest, error: str) -> None:
        update = RequestUpdate(request_id=request.request_id, instance_id="", finished=True,
                               finish_reason="error", error=error,
                               num_prompt_tokens=len(request.prompt_token_ids))
        await self.nc.publish(Subjects.updates(request.request_id), encode(update))


async def log_nats_error(error: Exception) -> None:
    """NATS connection trouble, in one line (the client retries on its own)."""
    logger.warning("NATS: %s", error or type(error).__name__)


@dataclass(frozen=True)
class _Listing:
    """The registered instances and the topology, as read from Redis at ``read_at``."""

    instance_ids: list[str]
    topology: Topology | None
    read_at: float  # monotonic

    def expired(self, ttl_s: float) -> bool:
        return time.monotonic() - self.read_at > ttl_s


def _read_topology(raw: bytes | None) -> Topology | None:
    if not raw:
        return None
    try:
        return decode(raw, Topology)
    except msgspec.DecodeError:
        logger.warning("ignoring an unreadable %s", RedisKeys.TOPOLOGY)
        return None
