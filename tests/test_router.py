"""The router: pure scoring, the atomic reserve script on a real Redis, dispatch on a real
NATS, and the whole path gateway-subject -> routers -> worker processes -> updates."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid

import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kunserve.protocol import (
    GenerateRequest,
    InstanceInfo,
    InstanceLoad,
    RedisKeys,
    RequestUpdate,
    Sampling,
    Subjects,
    Topology,
    decode,
    encode,
)
from kunserve.reservations import Reservations
from kunserve.router.load_balancer import InstanceView, dispatch_order, pick
from kunserve.router.router import NO_INSTANCE_ERROR, Router
from kunserve.router.settings import RouterSettings
from kunserve.telemetry import inject_headers, setup_tracing

pytest_plugins = ["tests.mesh_fixtures"]


def view(instance_id: str, **fields) -> InstanceView:
    return InstanceView(instance_id=instance_id, **{"blocks_total": 100, **fields})


# -- scoring (pure) ---------------------------------------------------------------------------
def test_pick_prefers_the_lowest_kv_demand():
    views = [view("a", blocks_used=50), view("b", blocks_used=20), view("c", blocks_used=30)]
    assert pick(views).instance_id == "b"


def test_queued_tokens_count_in_whole_blocks_and_reservations_in_tokens():
    # a: 10 used + ceil(17/16)=2 queued blocks = 12 blocks; b: 11 blocks + 16 reserved tokens
    a = view("a", blocks_used=10, queued_tokens=17)
    b = view("b", blocks_used=11, reserved_tokens=16)
    assert a.demand_tokens == 12 * 16 and b.demand_tokens == 12 * 16
    assert pick([a, view("b", blocks_used=11, reserved_tokens=15)]).instance_id == "b"
    assert pick([a, view("b", blocks_used=11, reserved_tokens=17)]).instance_id == "a"


def test_demand_is_relative_to_capacity():
    small = view("small", blocks_total=50, blocks_used=20)  # 40%
    big = view("big", blocks_total=200, blocks_used=60)  # 30%
    assert pick([small, big]).instance_id == "big"


def test_ties_go_to_fewest_requests_then_to_the_first():
    a = view("a", blocks_used=10, running=3)
    b = view("b", blocks_used=10, running=1, waiting=1)
    c = view("c", blocks_used=10, running=1, reserved_requests=1)
    assert pick([a, b, c]).instance_id == "b"
    assert pick([c, b]).instance_id == "c"


def test_unusable_instances_are_never_picked():
    assert pick([]) is None
    assert pick([view("a", blocks_total=0)]) is None
    assert pick([view("a", blocks_total=0), view("b", blocks_used=99)]).instance_id == "b"


def test_dispatch_order_skips_pipeline_followers_and_excluded():
    topology = Topology(epoch=3, instances=[
        InstanceInfo(instance_id="w1", state="pipelined", group_id="g", stage=0),
        InstanceInfo(instance_id="w2", state="pipelined", group_id="g", stage=1)])
    assert dispatch_order(["w3", "w2", "w1", "w0"], topology, exclude=["w0"]) == ["w1", "w3"]
    assert dispatch_order(["b", "a"], None) == ["a", "b"]


# -- the reserve script on a real Redis --------------------------------------------------------
async def write_load(client, view_: InstanceView, ttl_ms: int = 5000) -> None:
    load = InstanceLoad(instance_id=view_.instance_id, running=view_.running,
                        waiting=view_.waiting, blocks_total=view_.blocks_total,
                        blocks_used=view_.blocks_used, block_size=view_.block_size,
                        queued_tokens=view_.queued_tokens)
    key = RedisKeys.load(view_.instance_id)
    await client.hset(key, mapping=msgspec.structs.asdict(load))
    await client.pexpire(key, ttl_ms)
    if view_.reserved_requests or view_.reserved_tokens:
        await client.hset(RedisKeys.reserved(view_.instance_id),
                          mapping={"tokens": view_.reserved_tokens,
                                   "requests": view_.reserved_requests})


@pytest.fixture
async def redis_client(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def random_view(rng: random.Random, instance_id: str) -> InstanceView:
    total = rng.choice([0, 8, 64, 100, 1000])
    return InstanceView(
        instance_id=instance_id, blocks_total=total, blocks_used=rng.randint(0, total),
        block_size=rng.choice([8, 16, 32]), queued_tokens=rng.choice([0, 1, 15, 16, 17, 500]),
        running=rng.randint(0, 3), waiting=rng.randint(0, 2),
        reserved_tokens=rng.choice([0, 0, 7, 100, 4096]), reserved_requests=rng.randint(0, 2))


async def test_reserve_script_picks_what_the_pure_scoring_picks(redis_client):
    rng = random.Random(7)
    reservations = Reservations(redis_client)
    for case in range(150):
        views = [random_view(rng, f"c{case}-{i}") for i in range(rng.randint(1, 4))]
        if rng.random() < 0.3:  # force exact ties in demand
            views = [dataclasses.replace(views[0], instance_id=f"c{case}-t{i}",
                                         running=rng.randint(0, 2)) for i in range(3)]
        for v in views:
            await write_load(redis_client, v)
        expected = pick(views)
        chosen = await reservations.reserve([v.instance_id for v in views], tokens=5)
        assert chosen == (expected.instance_id if expected else None), views


async def test_concurrent_reservations_from_two_routers_do_not_herd(redis_url, redis_client):
    for instance_id in ("a", "b"):
        await write_load(redis_client, view(instance_id, blocks_used=10, running=2))
    clients = [aioredis.from_url(redis_url) for _ in range(2)]  # two routers' connections
    routers = [Reservations(c) for c in clients]
    try:
        n = 40
        chosen = await asyncio.gather(
            *(routers[i % 2].reserve(["a", "b"], tokens=48) for i in range(n)))
    finally:
        for c in clients:
            await c.aclose()
    counts = {i: int(await redis_client.hget(RedisKeys.reserved(i), "requests")) for i in "ab"}
    assert counts["a"] + counts["b"] == n
    assert abs(counts["a"] - counts["b"]) <= 1, counts
    assert sorted(chosen.count(i) for i in "ab") == sorted(counts.values())
    tokens = {i: int(await redis_client.hget(RedisKeys.reserved(i), "tokens")) for i in "ab"}
    assert tokens == {i: 48 * counts[i] for i in "ab"}


async def test_only_instances_with_a_live_load_key_are_picked(redis_client):
    reservations = Reservations(redis_client)
    await write_load(redis_client, view("expired"), ttl_ms=30)
    await write_load(redis_client, view("busy", blocks_used=95, running=9))
    await asyncio.sleep(0.1)
    assert await reservations.reserve(["expired", "never-registered", "busy"], 10) == "busy"
    await redis_client.delete(RedisKeys.load("busy"))
    assert await reservations.reserve(["expired", "busy"], 10) is None
    assert not await redis_client.exists(RedisKeys.reserved("expired"))


async def test_reservations_expire_and_release_never_goes_below_zero(redis_client):
    reservations = Reservations(redis_client, ttl_ms=3000)
    await write_load(redis_client, view("a"))
    assert await reservations.reserve(["a"], 100) == "a"
    key = RedisKeys.reserved("a")
    assert 0 < await redis_client.pttl(key) <= 3000
    await reservations.release("a", 30)
    assert await redis_client.hgetall(key) == {b"tokens": b"70", b"requests": b"0"}
    await reservations.release("a", 500, requests=3)
    assert await redis_client.hgetall(key) == {b"tokens": b"0", b"requests": b"0"}
    await reservations.release("gone", 10)  # an expired reservation is not recreated
    assert not await redis_client.exists(RedisKeys.reserved("gone"))


# -- dispatch on a real NATS ---------------------------------------------------------------
def make_request(prompt: list[int], max_tokens: int = 8, **sampling) -> GenerateRequest:
    return GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                           sampling=Sampling(max_tokens=max_tokens, temperature=0.0,
                                             ignore_eos=True, **sampling))


async def collect_updates(nc, request: GenerateRequest, subject: str = Subjects.GENERATE,
                          headers: dict | None = None, timeout: float = 30.0):
    updates: list[RequestUpdate] = []
    done = asyncio.Event()

    async def on_update(msg):
        updates.append(decode(msg.data, RequestUpdate))
        if updates[-1].finished:
            done.set()

    sub = await nc.subscribe(Subjects.updates(request.request_id), cb=on_update)
    await nc.publish(subject, encode(request), headers=headers)
    await asyncio.wait_for(done.wait(), timeout)
    await sub.unsubscribe()
    return updates


@pytest.fixture
async def router(nats_server, redis_url):
    exporter = InMemorySpanExporter()
    router = Router(RouterSettings(nats_url=nats_server.url, redis_url=redis_url),
                    span_exporter=exporter)
    await router.start()
    router.exporter = exporter
    yield router
    await router.stop()


async def test_no_live_instance_answers_with_an_error_update(nats_server, router):
    nc = await nats.connect(nats_server.url)
    tracing = setup_tracing("test-gateway")
    with tracing.get_tracer("test").start_as_current_span("gateway.request") as parent:
        headers = inject_headers()
    request = make_request([5, 6, 7])
    updates = await collect_updates(nc, request, headers=headers)
    reply = await nc.request(Subjects.GENERATE, encode(make_request([5])), timeout=5)
    await nc.close()
    assert updates == [RequestUpdate(request_id=request.request_id, instance_id="",
                                     finished=True, finish_reason="error",
                                     error=NO_INSTANCE_ERROR, num_prompt_tokens=3)]
    assert reply.data == b""  # the router answers a request with the chosen id: none
    spans = [s for s in router.exporter.get_finished_spans() if s.name == "router.dispatch"]
    ours = [s for s in spans if s.attributes["kunserve.request_id"] == request.request_id]
    assert ours[0].context.trace_id == parent.get_span_context().trace_id
    assert ours[0].parent.span_id == parent.get_span_context().span_id


async def test_instances_without_listener_or_refusing_are_skipped(nats_server, redis_client,
                                                                    router):
    # best first: ghost (live key, nobody subscribed), draining (refuses), real
    await write_load(redis_client, view("ghost"))
    await write_load(redis_client, view("draining", blocks_used=10))
    await write_load(redis_client, view("real", blocks_used=50))
    await redis_client.sadd(RedisKeys.INSTANCES, "ghost", "draining", "real")
    nc = await nats.connect(nats_server.url)
    received = asyncio.get_running_loop().create_future()

    async def draining_worker(msg):
        await msg.respond(b"draining")

    async def real_worker(msg):
        await msg.respond(b"")
        received.set_result((decode(msg.data, GenerateRequest), msg.headers))

    await nc.subscribe(Subjects.worker_generate("draining"), cb=draining_worker)
    await nc.subscribe(Subjects.worker_generate("real"), cb=real_worker)
    request = make_request([5, 6, 7], max_tokens=4)
    reply = await nc.request(Subjects.GENERATE, encode(request), timeout=5)
    forwarded, headers = await asyncio.wait_for(received, 5)
    await nc.close()
    assert reply.data == b"real"
    assert forwarded.request_id == request.request_id and forwarded.instance_id == "real"
    assert "traceparent" in headers
    for skipped in ("ghost", "draining"):  # released after the failed hand-off
        assert await redis_client.hgetall(RedisKeys.reserved(skipped)) == {
            b"tokens": b"0", b"requests": b"0"}
    assert await redis_client.hget(RedisKeys.reserved("real"), "tokens") == b"7"


# -- end to end: two routers, two worker processes --------------------------------------------
async def test_requests_spread_over_two_workers_and_all_complete(nats_server, mesh_model_dir,
                                                                  spawn_service, spawn_workers):
    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.sampling_params import SamplingParams

    routers = [spawn_service("kunserve.router", f"router{i}") for i in range(2)]
    workers = spawn_workers(["e2e-a", "e2e-b"])
    try:
        await asyncio.sleep(0.3)  # routers subscribed (they start much faster than workers)
        nc = await nats.connect(nats_server.url)
        rng = random.Random(3)
        requests = [make_request([rng.randrange(5, 500) for _ in range(4 + 3 * i)],
                                 max_tokens=6 + i) for i in range(8)]
        started = time.monotonic()
        results = await asyncio.gather(*(collect_updates(nc, r) for r in requests))
        elapsed = time.monotonic() - started
        await nc.close()
    finally:
        codes = [p.stop() for p in routers + workers]
    assert codes == [0, 0, 0, 0], [p.log() for p in routers + workers]
    reference = LLMEngine(EngineConfig(model=mesh_model_dir)).generate(
        [r.prompt_token_ids for r in requests],
        [SamplingParams(max_tokens=r.sampling.max_tokens, temperature=0.0, ignore_eos=True)
         for r in requests])
    used = set()
    for updates, ref in zip(results, reference, strict=True):
        assert updates[0].accepted and not updates[-1].error
        assert updates[-1].finish_reason == "length"
        assert [t for u in updates for t in u.token_ids] == ref.token_ids
        used.add(updates[-1].instance_id)
    assert used == {"e2e-a", "e2e-b"}
    assert elapsed < 20
