"""Admission control (429 with Retry-After before any SSE byte, budget freed when requests end)
and client disconnects (the request is aborted on its worker and its budget freed)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from test_gateway_harness import (
    MODEL_NAME,
    FakeMesh,
    clear_redis,
    gateway_client,
    make_settings,
    served_gateway,
)

from kunserve.gateway.admission import AdmissionController, AdmissionRejected

STREAM = {"model": MODEL_NAME, "prompt": "hello there", "max_tokens": 8, "stream": True}


@pytest.fixture
async def mesh():
    await clear_redis()
    async with FakeMesh(mode="hold") as fake:
        yield fake


def test_controller_counts_requests_and_tokens():
    admission = AdmissionController(max_requests=2, max_tokens=100)
    first = admission.try_admit(60)
    with pytest.raises(AdmissionRejected) as rejected:
        admission.try_admit(41)
    assert rejected.value.reason == "tokens"
    second = admission.try_admit(40)
    with pytest.raises(AdmissionRejected) as rejected:
        admission.try_admit(0)
    assert rejected.value.reason == "requests"
    first.release()
    first.release()  # idempotent
    assert (admission.requests, admission.tokens) == (1, 40)
    second.release()
    assert (admission.requests, admission.tokens) == (0, 0)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("budget", ["requests", "tokens"])
async def test_full_budget_is_429_with_retry_after_before_any_byte(tmp_path, mesh, budget):
    limits = ({"max_queued_requests": 1} if budget == "requests" else
              {"max_queued_tokens": 256, "max_model_len": 256})
    async with gateway_client(make_settings(tmp_path, retry_after_s=3, **limits)) as (app, c):
        long_prompt = "word " * 50 if budget == "tokens" else "hello"
        held = asyncio.create_task(c.post("/v1/completions", json={**STREAM,
                                                                   "prompt": long_prompt}))
        await wait_until(lambda: len(mesh.received) == 1)
        for stream in (True, False):
            body = {**STREAM, "prompt": long_prompt, "stream": stream}
            refused = await c.post("/v1/completions", json=body)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "3"
            assert refused.headers["content-type"] == "application/json"
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert ("budget of 256" if budget == "tokens" else "limit of 1 requests") in error[
                "message"]
        assert len(mesh.received) == 1  # the refused ones never reached the mesh
        metrics = (await c.get("/metrics")).text
        assert f'kunserve:admission_rejections_total{{budget="{budget}"}} 2.0' in metrics
        # the held request ends (aborted on the worker side): its budget comes back
        mesh._held.popitem()[1].set()
        assert (await held).status_code == 200
        assert app.state.admission.requests == 0 and app.state.admission.tokens == 0
        mesh.mode = "stream"
        assert (await c.post("/v1/completions", json=STREAM)).status_code == 200
        request_id = json.loads((await held).text.split("\n")[0][6:])["id"]
        row = await app.state.ledger.get(request_id)
        assert row["status"] == "aborted" and row["finish_reason"] == "abort"


async def test_client_disconnect_aborts_on_the_worker_and_frees_budget(tmp_path, mesh):
    settings = make_settings(tmp_path, max_queued_requests=1)
    with served_gateway(settings) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with client.stream("POST", "/v1/completions", json=STREAM) as response:
                assert response.status_code == 200
                rid = mesh.received[-1].request.request_id
                # the worker holds the request: nothing streams; the client gives up
            await asyncio.wait_for(mesh.aborted.wait(), 5)
            assert [a.request_id for a in mesh.aborts] == [rid]
            assert mesh.aborts[0].reason == "client disconnected"
            await wait_until(lambda: app.state.admission.requests == 0)
            mesh.mode = "stream"
            again = await client.post("/v1/completions", json={**STREAM, "stream": False})
            assert again.status_code == 200  # the one slot is free again


async def test_disconnect_mid_stream_and_non_streaming(tmp_path):
    await clear_redis()
    settings = make_settings(tmp_path)
    async with FakeMesh(token_delay_s=0.05) as mesh:
        with served_gateway(settings) as (url, app):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                async with client.stream("POST", "/v1/completions",
                                         json={**STREAM, "max_tokens": 200}) as response:
                    lines = response.aiter_lines()
                    assert (await anext(lines)).startswith("data: {")
                await asyncio.wait_for(mesh.aborted.wait(), 5)
                mesh.aborted.clear()
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/completions", json={**STREAM, "stream": False,
                                                               "max_tokens": 200}, timeout=0.3)
                await asyncio.wait_for(mesh.aborted.wait(), 5)
                assert len(mesh.aborts) == 2
                await wait_until(lambda: app.state.admission.requests == 0)
