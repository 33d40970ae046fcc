"""The llumnix baseline end to end, decision and mechanism: the real planner process
(``KUNSERVE_POLICY=llumnix``) watches two real worker processes on real NATS and Redis.
Requests go straight to w0 (not through the router, which would spread them), more than its
small KV cache holds, while w1 idles: w0 is short of KV with a queue, w1 has room, so the
planner migrates w0's running requests to w1, live, with their KV. Every request still ends
with exactly transformers' greedy tokens, some of them on w1, and the planner counts the
requests it moved (``kunserve:migrated_requests_total``)."""

from __future__ import annotations

import asyncio
import time

import msgspec

from kunserve.protocol import PlannerStats, RedisKeys
from kunserve.worker.engine import EngineConfig, LLMEngine
from tests.conftest import hf_greedy, make_prompts
from tests.test_worker_server import make_request, send

pytest_plugins = ["tests.mesh_fixtures"]

MAX_TOKENS = 100  # long enough not to end during a migration on a loaded machine
# prompts of 90-99 tokens (6-7 blocks): w0 admits four, which then preempt each other as they
# grow, so it always has requests waiting; a request never holds more than 13 blocks, so it
# fits what the planner moves, up to half w1's free blocks (14)
BLOCKS = 28


async def wait_for_planner(log_path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while "planner up" not in log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the planner did not come up:\n" + \
            log_path.read_text(errors="replace")
        await asyncio.sleep(0.05)


async def test_the_planner_migrates_from_the_short_instance_to_the_idle_one(
        spawn_workers, nats_server, redis_url, mesh_model_dir, nc, rclient, tmp_path):
    from tests.mesh_fixtures import service_env, start_service  # once pytest loaded the plugin

    memory = LLMEngine(EngineConfig(model=mesh_model_dir, max_num_batched_tokens=256,
                                    max_num_seqs=16)).memory  # the workers' limits
    budget = memory.parameter_bytes + memory.reserve_bytes + BLOCKS * memory.block_bytes
    workers = spawn_workers(["w0", "w1"], memory_per_instance=budget)
    planner = start_service("kunserve.planner", "planner", service_env(
        nats_server.url, redis_url, model=mesh_model_dir, policy="llumnix",
        topology_poll_interval=0.05), tmp_path)
    try:
        await wait_for_planner(planner.log_path)
        prompts = make_prompts(10, vocab=500, seed=21, lengths=[90 + i for i in range(10)])
        streams = [await send(nc, "w0", make_request(p, MAX_TOKENS)) for p in prompts]
        ended_on = []
        for stream, prompt in zip(streams, prompts, strict=True):
            updates = await stream.finished(120)
            assert [u.error for u in updates if u.error] == []
            assert stream.token_ids == hf_greedy(mesh_model_dir, prompt, MAX_TOKENS)
            ended_on.append(updates[-1].instance_id)
        fields = await rclient.hgetall(RedisKeys.PLANNER_STATS)
        stats = msgspec.convert({k.decode(): v.decode() for k, v in fields.items()},
                                PlannerStats, strict=False)
    finally:
        planner.stop()
    logs = "\n".join(line for w in workers for line in w.log().splitlines()
                     if "migrat" in line)
    assert "w1" in ended_on, (ended_on, planner.log()[-3000:], logs)
    assert stats.migrations_ok >= 1 and stats.migrations_failed == 0, stats
    assert stats.migrated_requests >= ended_on.count("w1"), (stats, ended_on)
