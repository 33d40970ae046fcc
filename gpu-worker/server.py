"""The worker process wrapper: NATS and Redis around one transport-free ``LLMEngine``.

Two sides:

* ``EngineThread`` owns the engine on one dedicated thread (every engine call happens there,
  fed by a thread-safe inbox). What it produces goes, from that thread, to an
  ``UpdatePublisher``: the request updates leave on a NATS connection of the engine thread's
  own, with no hand-over to the event loop per token (``engine_thread.py`` says why).
* ``WorkerServer`` (asyncio) subscribes to ``Subjects.worker_generate(id)`` and
  ``Subjects.ABORT``, feeds the inbox, keeps each request's span, writes the load to Redis,
  and publishes the few updates of requests that never reach the engine. The publisher tells
  it, on its loop, about load reports and each request's end.

What one request's updates subject carries: ``accepted``, then one update per step in which
the request produced tokens, the last one ``finished`` with ``finish_reason`` length | stop |
abort | error; or, when the request never reached the engine (bad sampling value, a prompt
the engine rejects, worker shutting down), a single finished update with ``error``. NATS
requests on the generate subject get a receipt once the request is in the engine's inbox:
empty when taken, ``DRAINING_REPLY`` when the worker is stopping.

Load goes to the Redis hash ``RedisKeys.load(id)`` (``InstanceLoad`` fields, PEXPIRE
``liveness_ttl_ms``). The engine thread writes it between steps; this loop pushes its expiry
back every ``liveness_ttl_ms / 3`` while the engine thread comes round within
``engine_stall_s``, so one long step (a long prefill of a larger model on a CPU) does not make
a live instance look dead to the gateways' failover and the routers. The router's
reservation for a request is released in the same MULTI as the first load write that shows
the request, so its demand is never counted twice or zero times. Where its job ends: no
scheduling or model logic here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import msgspec
import nats
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from redis.exceptions import RedisError

from kunserve.protocol import (
    AbortGroup,
    AbortRequest,
    CommitGroup,
    ControlCommand,
    ControlReply,
    GenerateRequest,
    MigrateRequests,
    PrepareGroup,
    RedisKeys,
    RequestUpdate,
    RestoreGroup,
    Subjects,
    decode,
    encode,
    subscriptions_in_place,
)
from kunserve.reservations import Reservations, reservation_tokens
from kunserve.telemetry import extract_context, request_tracer, setup_tracing
from kunserve.worker.engine import RequestOutput
from kunserve.worker.engine_thread import (
    AbortCommand,
    Aborted,
    Accepted,
    AddCommand,
    Adopted,
    EngineThread,
    Event,
    GroupCommand,
    HandedOff,
    Lost,
    Role,
    RoleChanged,
)
from kunserve.worker.load_writer import LoadReport, LoadWriter
from kunserve.worker.pipeline.group_member import activation_frame_bytes
from kunserve.worker.pipeline.stage_link import FRAME_BYTES, StageLink, meet
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

SHUTDOWN_ERROR = "worker shutting down"
DRAINING_REPLY = b"draining"  # receipt reply that refuses a request (the router tries another)
EARLY_ABORT_MEMORY_S = 60.0  # an abort that overtook its request is remembered this long


async def log_nats_error(error: Exception) -> None:
    """NATS connection trouble, in one line (the client retries on its own)."""
    logger.warning("NATS: %s", error or type(error).__name__)


@dataclass
class _Tracked:
    span: Span
    num_prompt_tokens: int


@dataclass
class Finished:
    """What the publisher tells the server when a request ends (wall-clock ns timestamps
    of the span's events, taken on the engine thread)."""

    update: RequestUpdate
    accepted_ns: int | None = None
    first_token_ns: int | None = None


@dataclass
class _Live:
    """A request the engine accepted and that has not finished (engine thread only)."""

    num_prompt_tokens: int
    accepted_ns: int
    first_token_ns: int | None = None


class UpdatePublisher:
    """The engine thread's outlet: publishes request updates on a NATS connection of its own,
    driven by the engine thread's loop, and hands load reports and request ends to the
    server's loop (``server_loop``) through the given callbacks."""

    def __init__(self, settings: WorkerSettings, server_loop: asyncio.AbstractEventLoop,
                 on_load: Callable[[LoadReport], None], on_finished: Callable[[Finished], None],
                 on_closed: Callable[[], None],
                 on_moved: Callable[[HandedOff | Adopted | RoleChanged], None]) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id
        self._server_loop = server_loop
        self._on_load, self._on_finished, self._on_closed = on_load, on_finished, on_closed
        self._on_moved = on_moved
        self._live: dict[str, _Live] = {}
        self.nc: nats.NATS | None = None

    async def open(self) -> None:
        self.nc = await nats.connect(self.settings.nats_url,
                                     name=f"kunserve-worker-{self.instance_id}-updates",
                                     error_cb=log_nats_error, closed_cb=self._closed)

    async def close(self) -> None:
        if self.nc is not None:
            if self.nc.is_connected:
                await self.nc.drain()  # what was published still goes out
            await self.nc.close()

    async def emit(self, event: Event) -> None:
        try:
            await self._handle(event)
        except Exception:  # the engine carries on; this request's client times out
            logger.exception("failed to publish %s", type(event).__name__)
        # one turn of the loop, in which the NATS client writes what was published: once
        # this returns the engine may step, and the loop waits for the step
        await asyncio.sleep(0)

    async def _closed(self) -> None:
        self._server_loop.call_soon_threadsafe(self._on_closed)

    async def _handle(self, event: Event) -> None:
        if isinstance(event, list):
            for out in event:
                await self._publish_output(out)
        elif isinstance(event, Accepted):
            self._live[event.request_id] = _Live(event.num_prompt_tokens, time.time_ns())
            await self._publish(RequestUpdate(
                request_id=event.request_id, instance_id=self.instance_id, accepted=True,
                num_prompt_tokens=event.num_prompt_tokens))
        elif isinstance(event, Aborted):
            live = self._live.get(event.request_id)
            if live is not None:  # else it finished already (or never started)
                await self._finish(RequestUpdate(
                    request_id=event.request_id, instance_id=self.instance_id, finished=True,
                    finish_reason="abort", error=event.error,
                    num_prompt_tokens=live.num_prompt_tokens))
        elif isinstance(event, LoadReport):
            self._server_loop.call_soon_threadsafe(self._on_load, event)
        elif isinstance(event, HandedOff):
            for request_id in event.request_ids:
                self._live.pop(request_id, None)
            self._server_loop.call_soon_threadsafe(self._on_moved, event)
        elif isinstance(event, Adopted):
            now = time.time_ns()
            self._live[event.request_id] = _Live(event.num_prompt_tokens, now,
                                                 now if event.num_output_tokens else None)
            self._server_loop.call_soon_threadsafe(self._on_moved, event)
        elif isinstance(event, Lost):
            for request_id in event.request_ids:
                await self._publish(RequestUpdate(request_id=request_id,
                                                  instance_id=self.instance_id, lost=True))
        elif isinstance(event, RoleChanged):
            self._server_loop.call_soon_threadsafe(self._on_moved, event)

    async def _publish_output(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is not None and out.new_token_ids and live.first_token_ns is None:
            live.first_token_ns = time.time_ns()
        update = RequestUpdate(
            request_id=out.request_id, instance_id=self.instance_id,
            token_ids=out.new_token_ids, text=out.new_text, finished=out.finished,
            finish_reason=out.finish_reason, error=out.error,
            invalid_request=out.invalid_request,
            num_prompt_tokens=out.num_prompt_tokens or (live.num_prompt_tokens if live else 0),
            num_output_tokens=out.num_output_tokens)
        await (self._finish(update) if out.finished else self._publish(update))

    async def _publish(self, update: RequestUpdate) -> None:
        if not self.nc.is_closed:
            await self.nc.publish(Subjects.updates(update.request_id), encode(update))

    async def _finish(self, update: RequestUpdate) -> None:
        live = self._live.pop(update.request_id, None)
        finished = Finished(update)
        if live is not None:
            finished.accepted_ns, finished.first_token_ns = live.accepted_ns, live.first_token_ns
        # the server hears of the end before anyone can read the last update: its span has
        # ended by then
        self._server_loop.call_soon_threadsafe(self._on_finished, finished)
        await self._publish(update)


class WorkerServer:
    def __init__(self, settings: WorkerSettings, span_exporter: SpanExporter | None = None):
        self.settings = settings
        self.instance_id = settings.instance_id
        self._tracing = setup_tracing("kunserve-worker", settings.otel_exporter,
                                      settings.otel_endpoint, span_exporter)
        self._owns_exporters = span_exporter is None
        self._tracer = request_tracer(self._tracing, "kunserve.worker", settings.otel_exporter,
                                      span_exporter)
        self.nc: nats.NATS | None = None
        self.redis: aioredis.Redis | None = None
        self._reservations: Reservations | None = None
        self._engine: EngineThread | None = None
        self._subs: list = []
        self._active: dict[str, _Tracked] = {}
        self._early_aborts = _RecentAborts()
        self._accepting = False
        self.connection_lost = asyncio.Event()  # NATS gave up reconnecting: the process exits
        self._idle = asyncio.Event()
        self._load_written = asyncio.Event()
        self._writer: LoadWriter | None = None
        self._keepalive: asyncio.Task | None = None
        self.memory_report: dict[str, int] = {}
        self._frame_bytes = FRAME_BYTES  # sized for the model once it is loaded
        self.role = Role()
        # formed, not committed: the plan, the serving link and the layer link
        self._prepared: tuple[PrepareGroup, StageLink, StageLink] | None = None
        self._reconfiguring = False
        # set before a commit that makes this instance a non-leader stage: from then on it
        # refuses requests (the engine would hand nothing to a stage), until it is solo again
        self._joining_as_follower = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the engine, connect, subscribe; returns once the first load is in Redis."""
        # the load writer exists before the engine thread, which reports a load at once
        self.redis = aioredis.from_url(self.settings.redis_url)
        self._reservations = Reservations(self.redis)
        self._writer = LoadWriter(self.redis, self._reservations, self.instance_id,
                                  self.settings.liveness_ttl_ms, self._load_written.set)
        publisher = UpdatePublisher(self.settings, asyncio.get_running_loop(),
                                    self._writer.submit, self._on_finished, self._lost_nats,
                                    self._on_moved)
        self._engine = EngineThread(self.settings, publisher)
        try:
            self.memory_report = await asyncio.wrap_future(self._engine.start())
            # every member of a group serves the same checkpoint and dtype: same frames
            self._frame_bytes = activation_frame_bytes(self.settings.model, self.settings.dtype)
            await self._connect()
        except BaseException:
            self._accepting = False
            await asyncio.to_thread(self._engine.stop)
            await self._writer.close()
            await self._close_connections()
            raise
        self._keepalive = asyncio.create_task(self._keep_alive())
        logger.info("worker %s serving %s", self.instance_id, self.settings.model)

    async def _connect(self) -> None:
        self.nc = await nats.connect(self.settings.nats_url,
                                     name=f"kunserve-worker-{self.instance_id}",
                                     error_cb=log_nats_error, closed_cb=self._on_nats_closed)
        generate = Subjects.worker_generate(self.instance_id)
        self._subs = [await self.nc.subscribe(generate, cb=self._on_generate),
                      await self.nc.subscribe(Subjects.ABORT, cb=self._on_abort),
                      await self.nc.subscribe(Subjects.control(self.instance_id),
                                              cb=self._on_control)]
        # a request published on another connection right after the start is not lost
        await subscriptions_in_place(self.nc)
        self._accepting = True
        self._writer.open()  # only now does the load key say this instance takes requests
        try:
            await asyncio.wait_for(self._load_written.wait(), timeout=10)
        except TimeoutError:
            raise ConnectionError("could not write this instance's load to Redis within 10 s "
                                  "(is KUNSERVE_REDIS_URL right?)") from None

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish within ``drain_timeout_s`` (abort
        the rest), stop the engine, delete the load key, close connections."""
        if not self._accepting:
            return
        self._accepting = False
        if self.nc.is_connected:
            await self._subs[0].drain()  # late requests get DRAINING_REPLY: router reroutes
        await self._drain_requests()
        self._keepalive.cancel()
        await asyncio.to_thread(self._engine.stop)
        await self._writer.close()
        try:  # gone from the routers' candidates now, not in liveness_ttl_ms
            await self.redis.delete(RedisKeys.load(self.instance_id),
                                    RedisKeys.reserved(self.instance_id))
        except RedisError as exc:
            logger.warning("could not delete the load key (it expires anyway): %s", exc)
        await self._close_connections()
        self._tracing.force_flush()
        if self._owns_exporters:
            self._tracing.shutdown()
        logger.info("worker %s stopped", self.instance_id)

    async def _keep_alive(self) -> None:
        period_s = self.settings.liveness_ttl_ms / 3000
        while True:
            await asyncio.sleep(period_s)
            if not self._engine.progressed_within(self.settings.engine_stall_s):
                continue  # hung: the key lapses, the gateways fail its requests over
            try:
                await self._writer.keep_alive()
            except (RedisError, OSError) as exc:
                logger.warning("could not refresh the load key: %s", exc)

    async def _close_connections(self) -> None:
        if self.nc is not None:
            if self.nc.is_connected:
                await self.nc.drain()
            await self.nc.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def _on_nats_closed(self) -> None:
        self._lost_nats()

    def _lost_nats(self) -> None:
        """Either connection (this loop's or the publisher's) closed for good."""
        if self._accepting:
            logger.error("lost NATS for good; stopping")
            self.connection_lost.set()

    async def _drain_requests(self) -> None:
        for timeout, abort in ((self.settings.drain_timeout_s, True), (5.0, False)):
            if self._active:
                self._idle.clear()
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout)
                except TimeoutError:
                    pass
            if not abort:
                break
            for request_id in list(self._active):
                self._engine.add(AbortCommand(request_id, SHUTDOWN_ERROR))

    # -- incoming ----------------------------------------------------------------------------
    async def _on_generate(self, msg: Msg) -> None:
        # what the receipt says (a refusal: the router reroutes); a pipeline stage other than
        # the leader takes no requests (the router learns it from the topology)
        accepting = self._accepting and not (self.role.follows or self._joining_as_follower)
        try:
            request = decode(msg.data, GenerateRequest)
        except msgspec.DecodeError as exc:
            logger.warning("dropped a malformed GenerateRequest: %s", exc)
            request = None
        try:
            if request is not None and accepting:
                await self._take(request, msg.headers)
            elif request is not None and not msg.reply:  # nobody will reroute it: say so
                await self._publish(RequestUpdate(
                    request_id=request.request_id, instance_id=self.instance_id,
                    finished=True, finish_reason="error", error=SHUTDOWN_ERROR,
                    num_prompt_tokens=len(request.prompt_token_ids)))
        finally:  # after the engine has it: the receipt is off the request's critical path
            if msg.reply:
                await msg.respond(b"" if accepting else DRAINING_REPLY)

    async def _take(self, request: GenerateRequest, headers: dict[str, str] | None) -> None:
        rid, n_prompt = request.request_id, len(request.prompt_token_ids)
        reserved = reservation_tokens(n_prompt, request.sampling.max_tokens)
        if rid in self._active:
            logger.warning("dropped a duplicate of request %s", rid)
            await self._reservations.release(self.instance_id, reserved)
            return
        span = self._tracer.start_span(
            "worker.generate", context=extract_context(headers), kind=SpanKind.CONSUMER,
            attributes={"kunserve.request_id": rid, "kunserve.instance_id": self.instance_id,
                        "kunserve.num_prompt_tokens": n_prompt})
        self._active[rid] = _Tracked(span, n_prompt)
        try:
            params = SamplingParams(**msgspec.structs.asdict(request.sampling))
        except ValueError as exc:
            await self._reservations.release(self.instance_id, reserved)
            update = RequestUpdate(request_id=rid, instance_id=self.instance_id, finished=True,
                                   finish_reason="error", error=str(exc),
                                   invalid_request=True, num_prompt_tokens=n_prompt)
            self._on_finished(Finished(update))
            await self._publish(update)
            return
        self._engine.add(AddCommand(rid, list(request.prompt_token_ids), params, reserved,
                                    request.resumed_tokens))
        if self._early_aborts.take(rid):
            self._engine.add(AbortCommand(rid))

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort = decode(msg.data, AbortRequest)
        except msgspec.DecodeError as exc:
            logger.warning("dropped a malformed AbortRequest: %s", exc)
            return
        if abort.request_id in self._active:
            self._engine.add(AbortCommand(abort.request_id))
        else:  # it may have overtaken its request (gateway -> router -> worker is longer)
            self._early_aborts.add(abort.request_id)

    # -- reconfiguration (the planner's control commands) -----------------------------------
    async def _on_control(self, msg: Msg) -> None:
        start = time.perf_counter()
        figures: dict[str, float] = {}
        try:
            command = msgspec.json.decode(msg.data, type=ControlCommand)
            error = await self._control(command, figures)
        except msgspec.DecodeError as exc:
            error = f"not a control command: {exc}"
        except Exception as exc:  # any failure is the planner's to see, not a crash
            logger.exception("control command failed")
            error = f"{type(exc).__name__}: {exc}"
        if msg.reply:
            await msg.respond(encode(ControlReply(
                instance_id=self.instance_id, ok=error is None, error=error,
                seconds=time.perf_counter() - start, figures=figures)))

    async def _control(self, command: ControlCommand, figures: dict[str, float]) -> str | None:
        """Carry out one command; the error to report, or None. What the engine measured
        goes into ``figures``."""
        if isinstance(command, PrepareGroup):
            return await self._prepare(command)
        if isinstance(command, AbortGroup):
            self._drop_prepared(command.epoch, command.group_id)
            return None
        if isinstance(command, CommitGroup):
            prepared = self._take_prepared(command.epoch, command.group_id)
            if prepared is None:
                return f"no prepared group {command.group_id} of epoch {command.epoch}"
            self._joining_as_follower = prepared[1].rank > 0
            error = await self._engine_group_command(GroupCommand(
                "join", Future(), link=prepared[1], group_id=command.group_id,
                layer_link=prepared[2]), figures)
            if error is not None:
                self._joining_as_follower = False
            return error
        if isinstance(command, MigrateRequests):
            prepared = self._take_prepared(command.epoch, command.group_id)
            if prepared is None:
                return f"no prepared group {command.group_id} of epoch {command.epoch}"
            return await self._engine_group_command(GroupCommand(
                "migrate", Future(), link=prepared[1], group_id=command.group_id,
                layer_link=prepared[2], blocks=command.blocks), figures)
        if isinstance(command, RestoreGroup):
            if self.role.group_id != command.group_id or self.role.state != "pipelined":
                return f"not in pipelined group {command.group_id}"
            if self.role.follows:
                return None  # the leader drives the restore over the group's link
            return await self._engine_group_command(GroupCommand("restore", Future()), figures)
        return f"unknown command {type(command).__name__}"

    async def _prepare(self, command: PrepareGroup) -> str | None:
        plan = command.plan
        if self.instance_id not in plan.members:
            return f"{self.instance_id} is not a member of group {plan.group_id}"
        if self._prepared is not None or self.role.state != "solo" or self._reconfiguring:
            return f"{self.instance_id} is already in or joining a group"
        rank = plan.members.index(self.instance_id)
        self._reconfiguring = True
        links: list[StageLink] = []
        try:
            for name in (plan.group_id, f"{plan.group_id}/layers"):  # serving, layer pulls
                links.append(await asyncio.to_thread(
                    meet, plan.store_host, plan.store_port, name, plan.epoch, rank,
                    len(plan.members), timeout_s=plan.timeout_s,
                    bind_host=self.settings.bind_host or None, frame_bytes=self._frame_bytes,
                    io_slice_us=self.settings.io_slice_us))
        except Exception as exc:
            for link in links:
                link.close()
            return f"could not form group {plan.group_id}: {exc}"
        finally:
            self._reconfiguring = False
        self._prepared = (command, *links)
        return None

    def _take_prepared(self, epoch: int, group_id: str
                       ) -> tuple[PrepareGroup, StageLink, StageLink] | None:
        prepared = self._prepared
        if prepared is None or (prepared[0].plan.epoch, prepared[0].plan.group_id) != (
                epoch, group_id):
            return None
        self._prepared = None
        return prepared

    def _drop_prepared(self, epoch: int, group_id: str) -> None:
        prepared = self._prepared
        if prepared is not None and (prepared[0].plan.epoch, prepared[0].plan.group_id) == (
                epoch, group_id):
            self._prepared = None
            prepared[1].close()
            prepared[2].close()

    async def _engine_group_command(self, command: GroupCommand,
                                    figures: dict[str, float]) -> str | None:
        """Hand a drop or restore to the engine thread and wait; a span records its phases,
        which also go into ``figures``."""
        self._reconfiguring = True
        name = {"join": "worker.drop"}.get(command.kind, f"worker.{command.kind}")
        with self._tracer.start_as_current_span(name, attributes={
                "kunserve.instance_id": self.instance_id,
                "kunserve.group_id": command.group_id or self.role.group_id}) as span:
            try:
                self._engine.add(command)
                phases = await asyncio.wrap_future(command.done)
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                return str(exc) or type(exc).__name__
            finally:
                self._reconfiguring = False
            for phase, seconds in phases.items():
                span.set_attribute(f"kunserve.phase.{phase}_s", seconds)
            figures.update(phases)
        return None

    def _on_moved(self, event: HandedOff | Adopted | RoleChanged) -> None:
        """Requests that left or joined this instance, or its new place in the topology."""
        if isinstance(event, RoleChanged):
            self.role = event.role
            if not event.role.follows:
                self._joining_as_follower = False
            logger.info("worker %s: %s", self.instance_id, event.role)
        elif isinstance(event, HandedOff):
            for request_id in event.request_ids:
                tracked = self._active.pop(request_id, None)
                if tracked is not None:
                    tracked.span.add_event("handed_off")
                    tracked.span.end()
            if not self._active:
                self._idle.set()
        else:
            span = self._tracer.start_span(
                "worker.generate", kind=SpanKind.CONSUMER,
                attributes={"kunserve.request_id": event.request_id,
                            "kunserve.instance_id": self.instance_id,
                            "kunserve.adopted": True,
                            "kunserve.num_prompt_tokens": event.num_prompt_tokens})
            self._active[event.request_id] = _Tracked(span, event.num_prompt_tokens)
            if self._early_aborts.take(event.request_id):  # aborted while it moved here
                self._engine.add(AbortCommand(event.request_id))

    # -- outgoing: the updates of requests that never reached the engine, request ends --------
    async def _publish(self, update: RequestUpdate) -> None:
        if not self.nc.is_closed:
            await self.nc.publish(Subjects.updates(update.request_id), encode(update))

    def _on_finished(self, finished: Finished) -> None:
        tracked = self._active.pop(finished.update.request_id, None)
        if tracked is None:
            return
        span, update = tracked.span, finished.update
        if finished.accepted_ns is not None:
            span.add_event("accepted", timestamp=finished.accepted_ns)
        if finished.first_token_ns is not None:
            span.add_event("first_token", timestamp=finished.first_token_ns)
        span.set_attribute("kunserve.num_output_tokens", update.num_output_tokens)
        span.set_attribute("kunserve.finish_reason", update.finish_reason or "")
        if update.error:
            span.set_status(Status(StatusCode.ERROR, update.error))
        span.end()
        if not self._active:
            self._idle.set()


class _RecentAborts:
    """Ids of aborts for requests this worker has not seen (yet), kept for a while. Every
    worker hears every abort, so this is bounded in time and size, pruned oldest first."""

    def __init__(self, keep_s: float = EARLY_ABORT_MEMORY_S, max_size: int = 100_000) -> None:
        self.keep_s, self.max_size = keep_s, max_size
        self._expiry: dict[str, float] = {}  # insertion order == expiry order

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        while self._expiry and (len(self._expiry) >= self.max_size
                                or next(iter(self._expiry.values())) <= now):
            del self._expiry[next(iter(self._expiry))]
        self._expiry.pop(request_id, None)  # re-added at the end, keeping the order
        self._expiry[request_id] = now + self.keep_s

    def take(self, request_id: str) -> bool:
        return self._expiry.pop(request_id, 0.0) > time.monotonic()
