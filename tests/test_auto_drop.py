"""The planner drops and restores by itself, on the real stack: ``kunserve up`` with 2 and 4
workers whose memory budget leaves each a small KV cache (256 tokens of a tiny 4-layer Llama,
hidden 128). A burst of concurrent requests whose prompts alone exceed what the instances hold solo
makes the planner drop on its own; every request completes (greedy ones with exactly
transformers' tokens); once the stack is idle the group restores on its own. ``GET
/v1/cluster`` must show each instance the plan merged go solo -> pipelined -> solo once (the
others stay solo: the plan merges only what the demand needs), the ledger's ``plans`` table the
automatic drops then restores of exactly those instances, ``/metrics`` the same counts."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from kunserve.ledger import PlanLedger
from tests.conftest import hf_greedy, make_prompts
from tests.stack import log_tail, running_stack
from tests.test_mesh_drop import TOKEN, cluster, wait_for_states

MAX_TOKENS = 64
KV_TOKENS = 256  # per instance, solo
REQUESTS = {2: 24, 4: 32}  # by instances
SAMPLED = 4  # requests with temperature: they must complete, their tokens are not compared


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from kunserve.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("auto-drop") / "l4", layers=4,
                               hidden_size=128, heads=4, kv_heads=2, intermediate_size=256,
                               vocab_size=512))


def budget(model_dir: str) -> int:
    """Parameters + the worker's activation reserve + ``KV_TOKENS`` of KV (fp32)."""
    from kunserve.worker.instance_memory import model_parameter_bytes
    from kunserve.worker.memory_budget import activation_reserve
    from kunserve.worker.model_config import ModelConfig

    model = ModelConfig.from_dir(model_dir)
    reserve = activation_reserve(model.hidden_size, model.intermediate_size,
                                 model.q_size + 2 * model.kv_size, model.vocab_size,
                                 max_num_batched_tokens=2048, max_num_seqs=128, dtype_bytes=4)
    kv_per_token = model.num_layers * 2 * model.num_kv_heads * model.head_dim * 4
    return model_parameter_bytes(model, "float32") + reserve + KV_TOKENS * kv_per_token


async def complete(client: httpx.AsyncClient, model: str, prompt: list[int],
                   seed: int | None) -> list[int]:
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed}
    response = await client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "return_token_ids": True, **sampling})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


async def watch(client: httpx.AsyncClient, seen: list[tuple[int, dict]],
                stop: asyncio.Event) -> None:
    """Every distinct (epoch, instance -> state) ``GET /v1/cluster`` shows."""
    while not stop.is_set():
        view = await cluster(client)
        entry = (view["epoch"], {i["id"]: i["state"] for i in view["instances"]})
        if not seen or seen[-1] != entry:
            seen.append(entry)
        await asyncio.sleep(0.05)


def state_changes(seen: list[tuple[int, dict]], instance: str) -> list[str]:
    """What ``instance`` went through, repeats and the transient states left out."""
    states: list[str] = []
    for _, view in seen:
        state = view.get(instance)
        if state in ("solo", "pipelined") and (not states or states[-1] != state):
            states.append(state)
    return states


async def burst_then_idle(url: str, model_dir: str, instances: int,
                          state_dir) -> tuple[list, str]:
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        solo = await wait_for_states(client, "solo", instances)
        solo_tokens = sum(i["blocks_total"] * 16 for i in solo["instances"])
        count = REQUESTS[instances]
        prompts = make_prompts(count, vocab=500, lengths=[60 + (13 * i) % 50
                                                          for i in range(count)])
        # the prompts alone are more than the instances hold solo: a queue must form
        assert sum(map(len, prompts)) > 2 * solo_tokens
        seeds = [None] * (count - SAMPLED) + list(range(SAMPLED))

        seen: list[tuple[int, dict]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(client, seen, stop))
        results = await asyncio.wait_for(asyncio.gather(
            *(complete(client, model, p, s) for p, s in zip(prompts, seeds, strict=True))), 240)
        # idle now: the group(s) restore by themselves within the restore window
        deadline = asyncio.get_running_loop().time() + 60
        while not (len(seen) > 1 and set(seen[-1][1].values()) == {"solo"}
                   and any("pipelined" in view.values() for _, view in seen)):
            assert asyncio.get_running_loop().time() < deadline, (
                seen[-5:], log_tail(state_dir, "planner"))
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # and nothing more happens
        stop.set()
        await watcher

        for prompt, seed, tokens in zip(prompts, seeds, results, strict=True):
            if seed is None:
                assert tokens == hf_greedy(model_dir, prompt, MAX_TOKENS)
            else:
                assert len(tokens) == MAX_TOKENS
        metrics = (await client.get("/metrics")).text
    return seen, metrics


@pytest.mark.parametrize("instances", [2, 4], ids=["2-instances", "4-instances"])
def test_a_burst_drops_by_itself_and_idle_restores_by_itself(model_dir, tmp_path, instances):
    with running_stack(model_dir, tmp_path, instances=instances, admin_token=TOKEN,
                       memory_per_instance=budget(model_dir), overload_window=0.1,
                       restore_window=1.0) as (_, url):
        seen, metrics = asyncio.run(burst_then_idle(url, model_dir, instances, tmp_path))
        plans = asyncio.run(read_plans(tmp_path))

    epochs = [epoch for epoch, _ in seen]
    assert epochs == sorted(epochs)
    # the plan merges only as far as the queued demand needs (with 4 instances one pair may
    # cover it), so an instance either stays solo or drops and restores exactly once
    changes = {instance: state_changes(seen, instance) for instance in seen[0][1]}
    assert all(c in (["solo"], ["solo", "pipelined", "solo"]) for c in changes.values()), seen
    dropped = sorted(i for i, c in changes.items() if c != ["solo"])
    assert len(dropped) >= 2, seen

    # the ledger: each group's automatic drop, then its restore, all succeeded; every
    # instance in exactly one of them
    drops = {p["group_id"]: p for p in plans if p["action"] == "drop"}
    restores = {p["group_id"]: p for p in plans if p["action"] == "restore"}
    assert len(plans) == 2 * len(drops) and set(restores) == set(drops), plans
    assert {(p["trigger"], p["outcome"]) for p in plans} == {("auto", "ok")}
    assert all(drops[g]["id"] < restores[g]["id"] for g in drops)
    assert sorted(m for p in drops.values() for m in p["members"]) == dropped
    for drop in drops.values():
        assert drop["figures"]["need_tokens"] > 0 and drop["figures"]["overloaded"]
        assert set(drop["phase_seconds"]) == {"prepare", "commit"}
    plan_count = len({p["plan_id"] for p in drops.values()})

    for name, value in (("drops_total", len(drops)), ("restores_total", len(restores))):
        assert re.search(rf'kunserve:{name}{{outcome="ok"}} {value}\.0', metrics), metrics
    assert f"kunserve:plan_seconds_count {plan_count}.0" in metrics


async def read_plans(state_dir) -> list[dict]:
    ledger = PlanLedger(f"sqlite+aiosqlite:///{state_dir / 'ledger.db'}")
    try:
        return await ledger.plans()
    finally:
        await ledger.close()
