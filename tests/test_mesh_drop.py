"""Parameter drop and restore as an operator runs them: ``kunserve up`` (real nats-server,
redis-server, planner, router, gateway and 2 or 4 worker processes), the admin endpoints
``POST /v1/cluster/drop|restore`` and ``GET /v1/cluster``, and greedy requests streaming over
the OpenAI API through both reconfigurations. Every request's tokens must be exactly
transformers'; memory must grow on the drop and come back on the restore; a member that cannot
prepare leaves everyone solo and serving."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests.conftest import hf_greedy, make_prompts
from tests.stack import running_stack

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_TOKENS = 32
KILLED_MAX_TOKENS = 300  # streams still running at the kill
LONG_TOKENS = 1500  # streams that outlast a drop and a restore (read partly: ``stop_after``)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from kunserve.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("drop-models")
    shape = dict(hidden_size=64, heads=4, kv_heads=2, intermediate_size=128, vocab_size=512)
    return {"5 layers": str(make_tiny_model(root / "l5", layers=5, **shape)),
            "4 layers": str(make_tiny_model(root / "l4", layers=4, **shape))}


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: list[int],
                            started: asyncio.Event, max_tokens: int = MAX_TOKENS,
                            tokens: list[int] | None = None) -> list[int]:
    """Stream one greedy completion; its token ids go into ``tokens`` as they arrive (so a
    caller can read them while it runs, or after cancelling it)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "return_token_ids": True}
    tokens = [] if tokens is None else tokens
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                tokens += choice.get("token_ids") or []
            if tokens:
                started.set()
    return tokens


async def start_streams(client, model: str, prompts: list[list[int]],
                        max_tokens: int = MAX_TOKENS
                        ) -> tuple[list[asyncio.Task], list[list[int]]]:
    """Start streaming completions; return once each has its first tokens (raising what a
    stream raised first), with the tasks and the token lists they fill."""
    started = [asyncio.Event() for _ in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    tasks = [asyncio.create_task(stream_completion(client, model, p, e, max_tokens, t))
             for p, e, t in zip(prompts, started, got, strict=True)]
    all_started = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in started)))
    pending = {all_started, *tasks}
    async with asyncio.timeout(60):
        while not all_started.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {all_started}:
                task.result()  # raises what a stream raised
    return tasks, got


async def stop_after(tasks: list[asyncio.Task], got: list[list[int]], more: int) -> None:
    """Let every stream get ``more`` tokens past what it has now (or end), then stop
    reading the rest (the gateway aborts them)."""
    marks = [len(tokens) for tokens in got]
    async with asyncio.timeout(60):
        while not all(task.done() or len(tokens) >= mark + more
                      for task, tokens, mark in zip(tasks, got, marks, strict=True)):
            await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if not isinstance(result, (list, asyncio.CancelledError)):
            raise result


async def cluster(client: httpx.AsyncClient) -> dict:
    response = await client.get("/v1/cluster", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_states(client, state: str, count: int, timeout: float = 20) -> dict:
    """GET /v1/cluster until ``count`` instances are in ``state`` (the workers' memory
    figures follow the topology within one load refresh)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        view = await cluster(client)
        found = [i for i in view["instances"] if i["state"] == state]
        if len(found) == count and all(i["kv_bytes"] for i in found):
            return view
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.1)


async def drop_and_restore_while_streaming(url: str, model_dir: str, instances: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        assert (await client.post("/v1/cluster/drop", json={})).status_code == 401
        solo = await wait_for_states(client, "solo", instances)
        solo_by_id = {i["id"]: i for i in solo["instances"]}

        prompts = make_prompts(2 * instances, vocab=500,
                               lengths=[4 + 7 * i for i in range(2 * instances)])
        tasks, got = await start_streams(client, model, prompts, LONG_TOKENS)

        dropped = await client.post("/v1/cluster/drop", json={}, headers=AUTH)
        assert dropped.status_code == 200, dropped.text
        assert not any(task.done() for task in tasks), "a stream ended before the drop did"
        group = dropped.json()["group"]
        view = await wait_for_states(client, "pipelined", instances)
        assert view["epoch"] == dropped.json()["epoch"]
        members = [i for i in view["instances"] if i["group_id"] == group]
        members.sort(key=lambda i: i["stage"])
        assert [i["stage"] for i in members] == list(range(instances))
        assert members[0]["layer_start"] == 0 and members[-1]["layer_end"] == members[
            0]["layer_end"] + sum(m["layer_end"] - m["layer_start"] for m in members[1:])
        solo_blocks = sum(i["blocks_total"] for i in solo["instances"])
        assert members[0]["blocks_total"] > solo_blocks  # blocks of block_size tokens each, solo or not
        for member in members:
            assert member["parameter_bytes"] < solo_by_id[member["id"]]["parameter_bytes"]

        # requests that arrive while pipelined go to the leader and stream too
        late = make_prompts(2, vocab=500, seed=5, lengths=[9, 3])
        late_tasks, late_got = await start_streams(client, model, late, LONG_TOKENS)
        tasks, got = tasks + late_tasks, got + late_got

        restored = await client.post("/v1/cluster/restore", json={"group": group},
                                     headers=AUTH)
        assert restored.status_code == 200, restored.text
        assert not any(task.done() for task in tasks), "a stream ended before the restore did"
        await stop_after(tasks, got, more=8)  # every stream goes on after the restore

        def memory(view: dict) -> dict:
            return {i["id"]: (i["parameter_bytes"], i["kv_bytes"], i["blocks_total"])
                    for i in view["instances"]}

        # every figure back to its solo value (the loads follow within one refresh)
        deadline = asyncio.get_running_loop().time() + 10
        while memory(back := await wait_for_states(client, "solo", instances)) != memory(solo):
            assert asyncio.get_running_loop().time() < deadline, (memory(back), memory(solo))
            await asyncio.sleep(0.1)

        # greedy: what each stream got is the start of transformers' continuation
        for prompt, tokens in zip(prompts + late, got, strict=True):
            assert len(tokens) > 8 and tokens == hf_greedy(model_dir, prompt, len(tokens))


@pytest.mark.parametrize("model,instances", [("5 layers", 2), ("4 layers", 4)],
                         ids=["2-instances-uneven-layers", "4-instances"])
def test_drop_and_restore_while_streaming_keep_every_token(models, tmp_path, model, instances):
    with running_stack(models[model], tmp_path, instances=instances,
                       admin_token=TOKEN) as (_, url):
        asyncio.run(drop_and_restore_while_streaming(url, models[model], instances))


def test_a_member_that_cannot_prepare_leaves_everyone_solo_and_serving(models, tmp_path):
    """worker-1 is frozen (SIGSTOP) so it never answers the prepare; the planner aborts the
    plan after its prepare timeout, worker-0 serves on solo; then worker-1 is killed."""
    with running_stack(models["4 layers"], tmp_path, instances=2, admin_token=TOKEN,
                       prepare_timeout=3) as (up, url):
        frozen = next(p for p in up.descendants()
                      if "KUNSERVE_INSTANCE_ID" in p.environ()
                      and p.environ()["KUNSERVE_INSTANCE_ID"] == "worker-1")

        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                os.kill(frozen.pid, signal.SIGSTOP)
                try:
                    failed = await client.post("/v1/cluster/drop", headers=AUTH,
                                               json={"instances": ["worker-0", "worker-1"]})
                finally:
                    os.kill(frozen.pid, signal.SIGKILL)
                assert failed.status_code == 503, failed.text
                assert "worker-1" in failed.json()["error"]["message"]
                view = await cluster(client)
                assert {i["id"]: i["state"] for i in view["instances"]}.get("worker-0") == "solo"
                prompt = make_prompts(1, vocab=500, seed=9, lengths=[12])[0]
                tokens = await stream_completion(client, model, prompt, asyncio.Event())
                assert tokens == hf_greedy(models["4 layers"], prompt, MAX_TOKENS)

        asyncio.run(run())


@pytest.mark.parametrize("victim", ["worker-0"], ids=["leader"])
def test_a_member_killed_while_pipelined_loses_no_request(models, tmp_path, victim):
    """SIGKILL the leader of a pipelined pair while greedy requests it serves stream. The
    survivor falls back to solo and the gateway resubmits the requests (prompt plus the tokens
    already streamed) to it: every stream ends with exactly transformers' tokens, none lost or
    repeated, and the gateway counts the failovers. (A killed follower: the leader recomputes its requests itself,
    ``test_worker_drop.py`` and ``test_reconfigure.py``.)"""
    with running_stack(models["4 layers"], tmp_path, instances=2,
                       admin_token=TOKEN) as (up, url):
        process = next(p for p in up.descendants()
                       if p.environ().get("KUNSERVE_INSTANCE_ID") == victim)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=180) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                await wait_for_states(client, "solo", 2)
                dropped = await client.post("/v1/cluster/drop", json={}, headers=AUTH)
                assert dropped.status_code == 200, dropped.text
                await wait_for_states(client, "pipelined", 2)
                # streams sent to the group (its leader), long enough to be running at the
                # kill: the tiny model decodes a few hundred tokens in about the time a drop
                # takes, so streams started before the drop had ended by then
                prompts = make_prompts(4, vocab=500, seed=3, lengths=[5, 14, 23, 8])
                tasks, _ = await start_streams(client, model, prompts, KILLED_MAX_TOKENS)
                assert not any(task.done() for task in tasks), "a stream ended before the kill"
                os.kill(process.pid, signal.SIGKILL)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 150)
                for prompt, tokens in zip(prompts, results, strict=True):
                    assert tokens == hf_greedy(models["4 layers"], prompt, KILLED_MAX_TOKENS)
                survivor = await wait_for_states(client, "solo", 1)
                assert [i["id"] for i in survivor["instances"]] == [
                    ({"worker-0", "worker-1"} - {victim}).pop()]
                # the leader held every request after the drop: each was resubmitted
                metrics = (await client.get("/metrics")).text
                failovers = [line for line in metrics.splitlines()
                             if line.startswith("kunserve:failovers_total")]
                assert failovers and float(failovers[0].split()[-1]) >= 1, failovers

        asyncio.run(run())
