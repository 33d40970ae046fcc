"""The gateway app: ``create_app(settings)`` builds it; its lifespan builds the clients.

At start: the served model's limits and tokenizer from the checkpoint, the tracer, the
admission budget and metrics, the ledger, NATS and Redis, all kept on ``app.state`` (see
``dependencies.py``), and the failover watchdog's task. At stop they are closed in reverse order. Tests run several apps in one
process: nothing here is global (per-app registry, per-app tracer provider).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import nats
import redis.asyncio as aioredis
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SpanExporter

from kunserve.gateway import admin, completions, monitoring
from kunserve.gateway.admission import AdmissionController
from kunserve.gateway.body_limit import BodySizeLimit
from kunserve.gateway.cluster_view import ClusterView
from kunserve.gateway.dispatcher import Dispatcher
from kunserve.gateway.errors import install_error_handlers
from kunserve.gateway.failover import InstanceWatchdog
from kunserve.gateway.json_bodies import JSONBodies
from kunserve.gateway.mesh_client import MeshClient
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.planner_client import PlannerClient
from kunserve.gateway.request_tracker import RequestLedger
from kunserve.gateway.served_model import ServedModel
from kunserve.gateway.settings import GatewaySettings
from kunserve.gateway.tokenization import PromptTokenizer
from kunserve.ledger import Ledger
from kunserve.telemetry import request_tracer, setup_tracing

logger = logging.getLogger(__name__)

LedgerFactory = Callable[[str], RequestLedger]
NATS_CONNECT_TIMEOUT_S = 10.0


def create_app(settings: GatewaySettings, span_exporter: SpanExporter | None = None,
               ledger_factory: LedgerFactory = Ledger) -> FastAPI:
    """``span_exporter``: an extra exporter (tests: the in-memory one), fed synchronously.
    ``ledger_factory``: builds the ledger from ``settings.database_url``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await _start(app, stack, settings, span_exporter, ledger_factory)
            yield

    app = FastAPI(title="KunServe-mesh gateway", summary="OpenAI-compatible API",
                  lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(JSONBodies)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(completions.router)
    app.include_router(monitoring.router)
    app.include_router(admin.router)
    return app


async def _start(app: FastAPI, stack: AsyncExitStack, settings: GatewaySettings,
                 span_exporter: SpanExporter | None, ledger_factory: LedgerFactory) -> None:
    state = app.state
    state.model = model = ServedModel.load(settings.model, settings.served_model_name,
                                           settings.max_model_len)
    if settings.max_queued_tokens < model.max_model_len:
        raise ValueError(f"max_queued_tokens ({settings.max_queued_tokens}) must be at least "
                         f"max_model_len ({model.max_model_len}): a full-length prompt could "
                         "never be admitted")
    state.tokenizer = PromptTokenizer(settings.model)
    tracing = setup_tracing("kunserve-gateway", settings.otel_exporter, settings.otel_endpoint,
                            span_exporter)
    stack.callback(tracing.shutdown)
    state.tracer = request_tracer(tracing, "kunserve.gateway", settings.otel_exporter,
                                  span_exporter)
    state.admission = AdmissionController(settings.max_queued_requests,
                                          settings.max_queued_tokens)
    state.metrics = GatewayMetrics(model.name, state.admission)
    state.ledger = ledger_factory(settings.database_url)
    await state.ledger.start()
    stack.push_async_callback(state.ledger.close)
    state.nats = await _connect_nats(settings.nats_url)
    stack.push_async_callback(state.nats.close)
    state.redis = aioredis.from_url(settings.redis_url)
    stack.push_async_callback(state.redis.aclose)
    state.cluster = ClusterView(state.redis)
    state.planner = PlannerClient(state.nats, state.tracer, settings.reconfigure_timeout_s)
    state.mesh = MeshClient(state.nats)
    await state.mesh.start()
    stack.push_async_callback(state.mesh.close)
    state.dispatcher = Dispatcher(
        model.name, state.admission, state.mesh, state.ledger, state.metrics, state.tracer,
        retry_after_s=settings.retry_after_s, dispatch_timeout_s=settings.dispatch_timeout_s,
        request_timeout_s=settings.request_timeout_s, max_failovers=settings.max_failovers)
    watchdog = InstanceWatchdog(state.cluster, state.dispatcher.in_flight,
                                settings.failover_check_s)
    stack.push_async_callback(_cancel, asyncio.create_task(watchdog.run()))
    stack.callback(state.dispatcher.close_all)  # first to run at stop
    logger.info("gateway serving %s (max_model_len %d) via %s", model.name,
                model.max_model_len, settings.nats_url)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _connect_nats(url: str) -> nats.NATS:
    nc = nats.NATS()

    async def on_error(exc: Exception) -> None:
        logger.warning("NATS: %r", exc)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):  # not our own shutdown
            logger.warning("NATS disconnected; reconnecting")

    async def on_reconnected() -> None:
        logger.info("NATS reconnected")

    try:  # once connected, reconnect forever; the first connect must succeed soon
        async with asyncio.timeout(NATS_CONNECT_TIMEOUT_S):
            await nc.connect(url, name="kunserve-gateway", max_reconnect_attempts=-1,
                             reconnect_time_wait=0.5, error_cb=on_error,
                             disconnected_cb=on_disconnected, reconnected_cb=on_reconnected)
    except TimeoutError:
        raise ConnectionError(f"cannot reach NATS at {url} within "
                              f"{NATS_CONNECT_TIMEOUT_S:g}s") from None
    return nc
