"""One trace per request across the three services: the real gateway app, router and worker
(in one process so they can share the in-memory span exporter), over a real nats-server and
redis-server, with a real model."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kunserve.gateway.app import create_app
from kunserve.gateway.settings import GatewaySettings
from kunserve.router.router import Router
from kunserve.router.settings import RouterSettings
from kunserve.worker.server import WorkerServer
from kunserve.worker.settings import WorkerSettings

pytest_plugins = ["tests.mesh_fixtures"]


async def test_one_trace_id_from_gateway_through_router_to_worker(
        nats_server, redis_url, mesh_model_dir, tmp_path):
    exporter = InMemorySpanExporter()
    urls = dict(nats_url=nats_server.url, redis_url=redis_url)
    worker = WorkerServer(WorkerSettings(model=mesh_model_dir, instance_id="w0", **urls),
                          span_exporter=exporter)
    router = Router(RouterSettings(**urls), span_exporter=exporter)
    await worker.start()
    await router.start()
    app = create_app(GatewaySettings(model=mesh_model_dir, max_model_len=256,
                                     database_url=f"sqlite+aiosqlite:///{tmp_path}/l.db",
                                     **urls), exporter)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw", timeout=60) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": "trace me", "max_tokens": 3})
                assert response.status_code == 200, response.text
    finally:
        await router.stop()
        await worker.stop()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    gateway, dispatch, work = (spans["gateway.completions"], spans["router.dispatch"],
                               spans["worker.generate"])
    assert gateway.context.trace_id == dispatch.context.trace_id == work.context.trace_id
    assert dispatch.parent.span_id == gateway.context.span_id
    assert work.parent.span_id == dispatch.context.span_id
    services = {s.resource.attributes["service.name"] for s in (gateway, dispatch, work)}
    assert len(services) == 3
