"""``GET /health`` and ``GET /metrics``.

``/health`` is 200 only when NATS is connected, Redis answers PING and at least one worker is
live (a ``kunserve:load:*`` key exists); otherwise 503 with the reasons in the body.
``/metrics`` refreshes the per-instance figures from Redis, then renders the app's registry.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from kunserve.gateway.cluster_view import REDIS_TIMEOUT_S
from kunserve.gateway.dependencies import ClusterDep, MetricsDep, NatsDep

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/health")
async def health(nc: NatsDep, cluster: ClusterDep) -> JSONResponse:
    reasons: list[str] = []
    if not nc.is_connected:
        reasons.append("NATS is not connected")
    instances: list[str] = []
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await cluster.ping()
            instances = await cluster.live_instances()
        if not instances:
            reasons.append("no live worker instance (no kunserve:load:* key in Redis)")
    except (RedisError, OSError, TimeoutError) as exc:
        reasons.append(f"Redis does not answer PING ({exc.__class__.__name__}: {exc})")
    body = {"status": "unavailable" if reasons else "ok", "reason": "; ".join(reasons) or None,
            "live_instances": instances}
    return JSONResponse(body, status_code=503 if reasons else 200)


@router.get("/metrics")
async def metrics(registry: MetricsDep, cluster: ClusterDep) -> Response:
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            registry.cluster.update(await cluster.loads(), await cluster.topology_epoch(),
                                    await cluster.planner_stats())
    except (RedisError, OSError, TimeoutError) as exc:  # serve the rest; keep the last read
        logger.warning("metrics: cannot read loads from Redis: %r", exc)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
