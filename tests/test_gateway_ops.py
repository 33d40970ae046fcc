"""/health, /metrics, /v1/models and traces."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_gateway_harness import (
    MODEL_NAME,
    FakeMesh,
    clear_redis,
    gateway_client,
    make_settings,
    model_dir,
    servers,
    sse_payloads,
)

from kunserve.protocol import RedisKeys, Topology, encode
from kunserve.servers import start_nats

VLLM_NAMES = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
              "vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
              "vllm:request_success_total", "kunserve:topology_epoch",
              "kunserve:admission_rejections_total"]


@pytest.fixture
async def mesh():
    await clear_redis()
    async with FakeMesh() as fake:
        yield fake


async def test_health_needs_nats_redis_and_a_live_worker(tmp_path, mesh):
    async with gateway_client(make_settings(tmp_path)) as (_, client):
        response = await client.get("/health")
        assert response.status_code == 503
        assert response.json()["reason"] == ("no live worker instance "
                                             "(no kunserve:load:* key in Redis)")
        await mesh.set_load(blocks_total=10)
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "reason": None, "live_instances": ["fake-0"]}


async def test_health_reports_nats_and_redis_down(tmp_path):
    nats_server = start_nats()
    settings = make_settings(tmp_path, nats_url=nats_server.url,
                             redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        async with gateway_client(settings) as (app, client):
            nats_server.stop()
            async with asyncio.timeout(5):
                while app.state.nats.is_connected:  # until the client notices
                    await asyncio.sleep(0.01)
            response = await client.get("/health")
            assert response.status_code == 503
            reason = response.json()["reason"]
            assert "NATS is not connected" in reason and "Redis does not answer PING" in reason
            refused = await client.post("/v1/completions", json={
                "model": MODEL_NAME, "prompt": "hi", "max_tokens": 1})
            assert refused.status_code == 503
            assert refused.json()["error"]["message"] == "NATS is not connected"
            assert (await client.get("/metrics")).status_code == 200  # still renders
    finally:
        nats_server.stop()


async def test_metrics_have_vllm_names_after_a_request(tmp_path, mesh):
    await mesh.set_load(running=2, waiting=1, blocks_total=200, blocks_used=50,
                        num_preemptions=3)
    redis = aioredis.from_url(servers().redis.url)
    await redis.set(RedisKeys.TOPOLOGY, encode(Topology(epoch=7)))
    await redis.aclose()
    async with gateway_client(make_settings(tmp_path)) as (_, client):
        response = await client.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": "hello", "max_tokens": 3})
        assert response.status_code == 200
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
        metrics = await client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in VLLM_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    labels = f'instance="fake-0",model_name="{MODEL_NAME}"'
    for sample in [f"vllm:kv_cache_usage_perc{{{labels}}} 0.25",
                   f"vllm:num_requests_running{{{labels}}} 2.0",
                   f"vllm:num_requests_waiting{{{labels}}} 1.0",
                   f"vllm:num_preemptions_total{{{labels}}} 3.0",
                   "kunserve:topology_epoch 7.0",
                   f'vllm:time_to_first_token_seconds_count{{model_name="{MODEL_NAME}"}} 1.0',
                   f'vllm:inter_token_latency_seconds_count{{model_name="{MODEL_NAME}"}} 2.0',
                   f'vllm:e2e_request_latency_seconds_count{{model_name="{MODEL_NAME}"}} 1.0',
                   f'vllm:request_queue_time_seconds_count{{model_name="{MODEL_NAME}"}} 1.0',
                   f'vllm:prompt_tokens_total{{model_name="{MODEL_NAME}"}} {prompt_tokens}.0',
                   f'vllm:generation_tokens_total{{model_name="{MODEL_NAME}"}} 3.0',
                   'vllm:request_success_total{finished_reason="length",'
                   f'model_name="{MODEL_NAME}"}} 1.0',
                   "kunserve:gateway_requests_in_flight 0.0"]:
        assert sample in text, sample


async def test_trace_context_reaches_the_mesh(tmp_path, mesh):
    exporter = InMemorySpanExporter()
    async with gateway_client(make_settings(tmp_path), exporter) as (_, client):
        response = await client.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "stream": True, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]})
        request_id = json.loads(sse_payloads(response.text)[0])["id"]
    spans = [s for s in exporter.get_finished_spans() if s.name == "gateway.completions"]
    assert len(spans) == 1
    span = spans[0]
    assert span.kind == SpanKind.SERVER
    assert span.attributes["kunserve.request_id"] == request_id
    assert span.attributes["kunserve.instance_id"] == "fake-0"
    assert span.attributes["gen_ai.usage.output_tokens"] == 2
    assert [e.name for e in span.events] == ["accepted", "first_token"]
    traceparent = mesh.received[0].headers["traceparent"]
    assert traceparent.split("-")[1] == f"{span.context.trace_id:032x}"


async def test_models_lists_the_served_model(tmp_path, mesh):
    async with gateway_client(make_settings(tmp_path)) as (_, client):
        body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"], m["root"]) for m in body["data"]] == [
        (MODEL_NAME, "model", 256, model_dir())]
