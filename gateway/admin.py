"""The cluster admin routes (bearer token): ``GET /v1/cluster``, ``POST /v1/cluster/drop``,
``POST /v1/cluster/restore``.

``GET /v1/cluster`` merges two records of Redis: the load hash each live worker writes (its
memory and blocks, and what it believes its place is) and the planner's topology (the place
the planner assigned it, with the epoch). The topology wins for the place: during a
reconfiguration it is the plan of record, and a worker's hash lags it by up to one refresh.
Only live instances (load key present) are listed; groups are formed from them.

Drop and restore are the planner's job: the gateway forwards them (``planner_client.py``)
and answers with the planner's reply, or its ``status`` and error on failure. Bodies are
validated here, after the token check: the handlers read the raw body themselves, so an
anonymous caller gets a 401, never a hint about the body's shape.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Annotated, TypeVar

from fastapi import APIRouter, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from redis.exceptions import RedisError

from kunserve.gateway.cluster_view import REDIS_TIMEOUT_S
from kunserve.gateway.dependencies import AdminDep, ClusterDep, PlannerDep
from kunserve.gateway.errors import invalid_body, service_unavailable
from kunserve.protocol import InstanceLoad, Reconfigure, ReconfigureReply, Topology

Body = TypeVar("Body", bound=BaseModel)

router = APIRouter()


# -- bodies ----------------------------------------------------------------------------------
InstanceId = Annotated[str, StringConstraints(min_length=1)]


class DropBody(BaseModel):
    """``instances``: the instances to merge into one group; none (or no body): every live
    instance (the planner resolves "every")."""

    model_config = ConfigDict(extra="forbid")

    instances: list[InstanceId] = []

    @field_validator("instances")
    @classmethod
    def _distinct(cls, instances: list[str]) -> list[str]:
        repeated = sorted({i for i in instances if instances.count(i) > 1})
        if repeated:
            raise ValueError(f"instances listed more than once: {', '.join(repeated)}")
        return instances


class RestoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: InstanceId = Field(description="the id of the group to split back into solo "
                                          "instances (GET /v1/cluster lists them)")


class ClusterInstance(BaseModel):
    id: str
    state: str  # solo | preparing | pipelined | restoring
    group_id: str | None  # None: solo, in no group
    stage: int
    layer_start: int  # the layers held: [layer_start, layer_end)
    layer_end: int
    parameter_bytes: int
    kv_bytes: int
    budget_bytes: int
    reserve_bytes: int
    blocks_total: int
    blocks_used: int


class ClusterGroup(BaseModel):
    id: str
    members: list[str]  # stage order: members[0] is the leader
    state: str  # the leader's


class Cluster(BaseModel):
    object: str = "cluster"
    epoch: int
    instances: list[ClusterInstance]
    groups: list[ClusterGroup]


class Reconfigured(BaseModel):
    epoch: int
    group: str
    phase_seconds: dict[str, float]


# -- routes ----------------------------------------------------------------------------------
@router.get("/v1/cluster")
async def get_cluster(_: AdminDep, cluster: ClusterDep) -> Cluster:
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            loads, topology = await cluster.loads(), await cluster.topology()
    except (RedisError, OSError, TimeoutError) as exc:
        raise service_unavailable(f"cannot read the cluster from Redis "
                                  f"({exc.__class__.__name__}: {exc})") from None
    return describe_cluster(loads, topology)


@router.post("/v1/cluster/drop", responses={200: {"model": Reconfigured}})
async def drop(_: AdminDep, request: Request, planner: PlannerDep) -> Reconfigured:
    body = await _body(DropBody, request)
    return _reconfigured(await planner.reconfigure(
        Reconfigure(action="drop", instances=body.instances)))


@router.post("/v1/cluster/restore", responses={200: {"model": Reconfigured}})
async def restore(_: AdminDep, request: Request, planner: PlannerDep) -> Reconfigured:
    body = await _body(RestoreBody, request)
    return _reconfigured(await planner.reconfigure(
        Reconfigure(action="restore", group=body.group)))


# -- helpers ---------------------------------------------------------------------------------
def describe_cluster(loads: list[InstanceLoad], topology: Topology) -> Cluster:
    """The live instances (one per load) with their place taken from the topology when it
    lists them, from their own load otherwise; groups of those that are in one."""
    placed = {info.instance_id: info for info in topology.instances}
    instances = []
    for load in sorted(loads, key=lambda load: load.instance_id):
        place = placed.get(load.instance_id, load)
        instances.append(ClusterInstance(
            id=load.instance_id, state=place.state, group_id=place.group_id or None,
            stage=place.stage, layer_start=place.layer_start, layer_end=place.layer_end,
            parameter_bytes=load.parameter_bytes, kv_bytes=load.kv_bytes,
            budget_bytes=load.budget_bytes, reserve_bytes=load.reserve_bytes,
            blocks_total=load.blocks_total, blocks_used=load.blocks_used))
    members: dict[str, list[ClusterInstance]] = defaultdict(list)
    for instance in instances:
        if instance.group_id is not None:
            members[instance.group_id].append(instance)
    groups = []
    for group_id, group in sorted(members.items()):
        group.sort(key=lambda instance: instance.stage)
        groups.append(ClusterGroup(id=group_id, members=[i.id for i in group],
                                   state=group[0].state))
    return Cluster(epoch=topology.epoch, instances=instances, groups=groups)


async def _body(kind: type[Body], request: Request) -> Body:
    """The request's body as ``kind``; an empty body means every default (``{}``)."""
    raw = await request.body()
    try:
        return kind.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None


def _reconfigured(reply: ReconfigureReply) -> Reconfigured:
    return Reconfigured(epoch=reply.epoch, group=reply.group, phase_seconds=reply.phase_seconds)
