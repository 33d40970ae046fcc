"""The cluster admin endpoints: the token, the body checks, the planner's answers mapped to
HTTP, and ``GET /v1/cluster`` read from Redis.

A stub planner answers ``Subjects.RECONFIGURE`` on the real nats-server (the gateway is under
test here, not the planner); loads and the topology are written to the real redis-server the
way workers and the planner write them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_gateway_errors import assert_openai_error
from test_gateway_harness import clear_redis, gateway_client, make_settings, servers

from kunserve.protocol import (
    InstanceInfo,
    InstanceLoad,
    Reconfigure,
    ReconfigureReply,
    RedisKeys,
    Subjects,
    Topology,
    decode,
    encode,
)

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DONE = ReconfigureReply(ok=True, epoch=3, group="g-3",
                        phase_seconds={"prepare": 1.25, "commit": 4.5})


@dataclass
class PlannerStub:
    """Answers every ``Reconfigure`` with ``reply`` after ``delay_s``, and keeps what it got."""

    reply: ReconfigureReply = DONE
    delay_s: float = 0.0
    received: list[Reconfigure] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def __aenter__(self) -> PlannerStub:
        self.nc = await nats.connect(servers().nats.url)
        await self.nc.subscribe(Subjects.RECONFIGURE, cb=self._answer)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def _answer(self, msg) -> None:
        self.received.append(decode(msg.data, Reconfigure))
        self.headers.append(dict(msg.headers or {}))
        await asyncio.sleep(self.delay_s)
        await msg.respond(encode(self.reply))


@pytest.fixture
async def planner():
    async with PlannerStub() as stub:
        yield stub


@pytest.fixture
async def client(tmp_path):
    async with gateway_client(make_settings(tmp_path, admin_token=TOKEN)) as (_, http):
        yield http


ROUTES = [("get", "/v1/cluster"), ("post", "/v1/cluster/drop"), ("post", "/v1/cluster/restore")]


@pytest.mark.parametrize("method, path", ROUTES)
async def test_every_admin_route_needs_the_token(client, planner, method, path):
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Bearer {TOKEN}x"}]:
        response = await client.request(method, path, headers=headers, content=b"{not json")
        error = assert_openai_error(response, 401, "admin bearer token", code="invalid_api_key")
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert planner.received == []  # nothing reached the planner


async def test_admin_routes_are_closed_without_a_configured_token(tmp_path, planner):
    async with gateway_client(make_settings(tmp_path)) as (_, http):
        response = await http.post("/v1/cluster/drop", headers={"Authorization": "Bearer "})
    assert_openai_error(response, 401, "the gateway has no admin token")
    assert planner.received == []


async def test_drop_forwards_the_instances_and_answers_the_planners_reply(tmp_path, planner):
    exporter = InMemorySpanExporter()
    settings = make_settings(tmp_path, admin_token=TOKEN)
    async with gateway_client(settings, exporter) as (_, client):
        response = await client.post("/v1/cluster/drop", headers=AUTH,
                                     json={"instances": ["worker-0", "worker-1"]})
    assert response.status_code == 200, response.text
    assert response.json() == {"epoch": 3, "group": "g-3",
                               "phase_seconds": {"prepare": 1.25, "commit": 4.5}}
    assert planner.received == [Reconfigure(action="drop", instances=["worker-0", "worker-1"])]
    [span] = [s for s in exporter.get_finished_spans() if s.name == "gateway.cluster.drop"]
    assert span.attributes["kunserve.epoch"] == 3
    # the planner's phase spans can join the admin call's trace
    _, trace_id, span_id, _ = planner.headers[0]["traceparent"].split("-")
    assert (trace_id, span_id) == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")


@pytest.mark.parametrize("body", [None, {}, {"instances": []}])
async def test_drop_without_instances_asks_for_every_live_one(client, planner, body):
    response = await client.post("/v1/cluster/drop", headers=AUTH, json=body)
    assert response.status_code == 200, response.text
    assert planner.received == [Reconfigure(action="drop", instances=[])]


async def test_restore_forwards_the_group(client, planner):
    response = await client.post("/v1/cluster/restore", headers=AUTH, json={"group": "g-3"})
    assert response.status_code == 200, response.text
    assert response.json()["epoch"] == 3
    assert planner.received == [Reconfigure(action="restore", group="g-3")]


@pytest.mark.parametrize("path, body, message, param", [
    ("drop", b"{not json", "malformed JSON body", None),
    ("drop", b'{"instances": "worker-0"}', "instances: Input should be a valid array",
     "instances"),
    ("drop", b'{"instances": ["worker-0", 7]}', "instances[1]: Input should be a valid string",
     "instances[1]"),
    ("drop", b'{"instances": [""]}', "instances[0]: String should have at least 1 character",
     "instances[0]"),
    ("drop", b'{"instances": ["w", "x", "w"]}', "instances listed more than once: w",
     "instances"),
    ("drop", b'{"instance": ["worker-0"]}', "instance: Extra inputs are not permitted",
     "instance"),
    ("restore", b"", "group: Field required", "group"),
    ("restore", b'{"group": ""}', "group: String should have at least 1 character", "group"),
    ("restore", b'["g-3"]', "Input should be an object", None),
])
async def test_bad_bodies_get_400_and_never_reach_the_planner(client, planner, path, body,
                                                              message, param):
    response = await client.post(f"/v1/cluster/{path}", headers=AUTH, content=body)
    error = assert_openai_error(response, 400, message, param=param)
    assert error["type"] == "invalid_request_error"
    assert planner.received == []


@pytest.mark.parametrize("status, error_type, code", [
    (400, "invalid_request_error", None),
    (409, "conflict_error", "reconfiguration_in_progress"),
    (503, "service_unavailable_error", "service_unavailable"),
])
async def test_a_refusal_is_answered_with_the_planners_status(client, planner, status,
                                                              error_type, code):
    planner.reply = ReconfigureReply(ok=False, status=status, error=f"refused with {status}")
    response = await client.post("/v1/cluster/drop", headers=AUTH, json={"instances": ["w9"]})
    error = assert_openai_error(response, status, f"refused with {status}", code=code)
    assert error["type"] == error_type
    assert planner.received == [Reconfigure(action="drop", instances=["w9"])]


async def test_a_conflict_carries_the_planners_code(client, planner):
    planner.reply = ReconfigureReply(ok=False, status=409, code="instance_in_group",
                                     error="instance w1 is already in group g2 (pipelined)")
    response = await client.post("/v1/cluster/drop", headers=AUTH,
                                 json={"instances": ["w1", "w3"]})
    assert_openai_error(response, 409, "already in group g2", code="instance_in_group")


async def test_no_planner_is_503(client):
    for path, body in [("drop", {}), ("restore", {"group": "g-3"})]:
        response = await client.post(f"/v1/cluster/{path}", headers=AUTH, json=body)
        assert_openai_error(response, 503, "no planner is running", code="service_unavailable")


async def test_a_planner_slower_than_the_timeout_is_503(tmp_path, planner):
    planner.delay_s = 1.0
    settings = make_settings(tmp_path, admin_token=TOKEN, reconfigure_timeout_s=0.2)
    async with gateway_client(settings) as (_, http):
        response = await http.post("/v1/cluster/restore", headers=AUTH, json={"group": "g-3"})
    assert_openai_error(response, 503, "the planner did not answer within 0.2s")


# -- GET /v1/cluster -------------------------------------------------------------------------
MiB = 1 << 20


async def write_cluster(loads: list[InstanceLoad], topology: Topology | None) -> None:
    """As the workers (load hashes) and the planner (topology key) write them."""
    await clear_redis()
    redis = aioredis.from_url(servers().redis.url)
    for load in loads:
        await redis.hset(RedisKeys.load(load.instance_id), mapping=msgspec.structs.asdict(load))
    if topology is not None:
        await redis.set(RedisKeys.TOPOLOGY, encode(topology))
    await redis.aclose()


def load(instance_id: str, **fields) -> InstanceLoad:
    memory = dict(parameter_bytes=40 * MiB, kv_bytes=52 * MiB, budget_bytes=100 * MiB,
                  reserve_bytes=8 * MiB, blocks_total=400, blocks_used=100, layer_end=4)
    return InstanceLoad(instance_id=instance_id, **{**memory, **fields})


async def test_cluster_merges_the_topology_with_the_live_loads(client):
    # worker-1's hash still says solo (it lags the plan); worker-9 is in the topology but
    # dead (no load key); worker-2 is live but not in the topology yet
    await write_cluster(
        [load("worker-0", state="pipelined", group_id="g-5", layer_end=2, kv_bytes=72 * MiB,
              parameter_bytes=20 * MiB, blocks_used=250, blocks_total=560),
         load("worker-1", parameter_bytes=20 * MiB, kv_bytes=72 * MiB, blocks_total=560),
         load("worker-2")],
        Topology(epoch=5, instances=[
            InstanceInfo(instance_id="worker-1", state="pipelined", group_id="g-5", stage=1,
                         layer_start=2, layer_end=4),
            InstanceInfo(instance_id="worker-0", state="pipelined", group_id="g-5", stage=0,
                         layer_start=0, layer_end=2),
            InstanceInfo(instance_id="worker-9", layer_end=4)]))
    response = await client.get("/v1/cluster", headers=AUTH)
    assert response.status_code == 200, response.text
    pipelined = dict(state="pipelined", group_id="g-5", parameter_bytes=20 * MiB,
                     kv_bytes=72 * MiB, budget_bytes=100 * MiB, reserve_bytes=8 * MiB,
                     blocks_total=560)
    assert response.json() == {
        "object": "cluster", "epoch": 5,
        "instances": [
            {"id": "worker-0", **pipelined, "stage": 0, "layer_start": 0, "layer_end": 2,
             "blocks_used": 250},
            {"id": "worker-1", **pipelined, "stage": 1, "layer_start": 2, "layer_end": 4,
             "blocks_used": 100},
            {"id": "worker-2", "state": "solo", "group_id": None, "stage": 0, "layer_start": 0,
             "layer_end": 4, "parameter_bytes": 40 * MiB, "kv_bytes": 52 * MiB,
             "budget_bytes": 100 * MiB, "reserve_bytes": 8 * MiB, "blocks_total": 400,
             "blocks_used": 100}],
        "groups": [{"id": "g-5", "members": ["worker-0", "worker-1"], "state": "pipelined"}]}


async def test_cluster_before_the_planner_wrote_a_topology(client):
    await write_cluster([load("worker-0", state="preparing", group_id="g-1")], None)
    body = (await client.get("/v1/cluster", headers=AUTH)).json()
    assert body["epoch"] == 0
    assert [(i["id"], i["state"], i["group_id"]) for i in body["instances"]] == [
        ("worker-0", "preparing", "g-1")]  # the worker's own word, lacking the planner's
    assert body["groups"] == [{"id": "g-1", "members": ["worker-0"], "state": "preparing"}]


async def test_cluster_is_503_when_redis_is_down(tmp_path):
    settings = make_settings(tmp_path, admin_token=TOKEN, redis_url="redis://127.0.0.1:1/0")
    async with gateway_client(settings) as (_, http):
        response = await http.get("/v1/cluster", headers=AUTH)
    assert_openai_error(response, 503, "cannot read the cluster from Redis")
