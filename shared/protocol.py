"""The wire schema: every NATS message and Redis record of the mesh, in one place.

Messages are msgspec structs encoded as JSON. One subject per message kind (see ``Subjects``).
NATS carries control messages, requests and token deltas only; activations and KV bytes go
worker-to-worker over torch.distributed (DESIGN §1).

Request flow::

    gateway --GenerateRequest--> kunserve.generate            (router queue group)
    router  --GenerateRequest--> kunserve.worker.<id>.generate (instance_id filled in)
    worker  --RequestUpdate----> kunserve.updates.<request_id> (accepted, then one per step)
    gateway --AbortRequest-----> kunserve.abort                (every worker; the owner acts)

Reconfiguration (DESIGN §4; request/reply, the reply is the outcome)::

    gateway -----Reconfigure-------> kunserve.planner.reconfigure  (admin drop/restore)
    planner -----ControlCommand----> kunserve.control.<id>         (PrepareGroup, CommitGroup,
                                                                    AbortGroup, RestoreGroup)
    worker  -----ControlReply------> (the request's reply inbox)

A drop is two-phase: ``PrepareGroup`` to every member (each forms the epoch's process group
through the TCPStore named in the plan and answers), then ``CommitGroup`` to every member
when all answered ok, else ``AbortGroup`` (everyone stays solo). A restore is one
``RestoreGroup`` to every member; each answers once it serves solo again.
"""

from __future__ import annotations

import time
from typing import TypeVar

import msgspec

T = TypeVar("T")


async def subscriptions_in_place(nc) -> None:
    """Return once the NATS server holds every subscription client ``nc`` has made, so that a
    message another connection publishes from now on reaches them. One ``flush`` is not
    enough with nats-py 2.16: it writes its PING straight to the socket, ahead of the SUBs
    still queued for the client's flusher task, so the PONG can come back first (seen under
    CPU load: a worker's first request after its start never arrived). During the first
    round trip the flusher writes the SUBs; the second PING follows them."""
    await nc.flush()
    await nc.flush()


class Subjects:
    GENERATE = "kunserve.generate"
    ABORT = "kunserve.abort"
    TOPOLOGY = "kunserve.topology"
    ROUTER_QUEUE = "routers"

    @staticmethod
    def worker_generate(instance_id: str) -> str:
        return f"kunserve.worker.{instance_id}.generate"

    @staticmethod
    def updates(request_id: str) -> str:
        return f"kunserve.updates.{request_id}"

    @staticmethod
    def control(instance_id: str) -> str:
        return f"kunserve.control.{instance_id}"

    RECONFIGURE = "kunserve.planner.reconfigure"


class RedisKeys:
    """Load is written by each worker, reservations by routers, topology by the planner."""

    INSTANCES = "kunserve:instances"  # set of instance ids ever registered
    TOPOLOGY = "kunserve:topology"  # JSON Topology, owned by the planner
    PLANNER_STATS = "kunserve:planner:stats"  # hash of PlannerStats counters (the planner's)
    AUTO_GROUPS = "kunserve:planner:auto-groups"  # set: groups the planner dropped by itself

    @staticmethod
    def load(instance_id: str) -> str:  # hash of InstanceLoad fields, expires (liveness)
        return f"kunserve:load:{instance_id}"

    @staticmethod
    def reserved(instance_id: str) -> str:  # hash: tokens, requests (dispatched, not taken)
        return f"kunserve:reserved:{instance_id}"


class Sampling(msgspec.Struct, kw_only=True):
    """The wire form of ``SamplingParams``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class GenerateRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    arrival_time: float = msgspec.field(default_factory=time.time)  # wall clock, seconds
    instance_id: str | None = None  # set by the router
    # a failover's resubmission: the last this many prompt tokens are output the request
    # already streamed (``sampling.max_tokens`` counts what is left); the worker goes on as
    # the request would have: they count for the penalties, a seeded request's random stream
    # starts past their draws, and their text is sent again first (the gateway skips what
    # the client has)
    resumed_tokens: int = 0


class RequestUpdate(msgspec.Struct, kw_only=True):
    """What a worker tells the gateway about one request: first ``accepted``, then one
    message per engine step in which the request produced tokens, the last with
    ``finished``."""

    request_id: str
    instance_id: str
    accepted: bool = False
    token_ids: list[int] = []
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    # the sender no longer has the request: it handed it to its group's leader at a drop and
    # the group broke; the gateway resubmits it unless its updates come from another
    # instance by now (that one holds it; its death is noticed as any instance's)
    lost: bool = False
    # the error is the request's (a prompt this instance cannot hold, bad sampling values):
    # the client gets a 400, not a 500
    invalid_request: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class AbortRequest(msgspec.Struct, kw_only=True):
    request_id: str
    reason: str = "client disconnected"


class InstanceLoad(msgspec.Struct, kw_only=True):
    """A worker's load, refreshed at step boundaries (at most every 100 ms)."""

    instance_id: str
    running: int = 0
    waiting: int = 0
    blocks_total: int = 0
    blocks_used: int = 0
    block_size: int = 16
    queued_tokens: int = 0  # prompt tokens of waiting requests not yet computed
    kv_bound: int = 0  # 1: the last step held a request back for want of free KV blocks
    num_preemptions: int = 0
    num_swaps: int = 0  # preemptions that swapped KV to host memory (infercept policy)
    swap_bytes: int = 0  # KV bytes copied to and from host memory so far
    swap_seconds: float = 0.0  # time those copies took
    epoch: int = 0
    updated_at: float = 0.0
    # what this instance holds (GET /v1/cluster): its place in the topology and its memory
    state: str = "solo"  # solo | preparing | pipelined | restoring
    group_id: str = ""
    stage: int = 0
    layer_start: int = 0
    layer_end: int = 0
    parameter_bytes: int = 0
    kv_bytes: int = 0
    budget_bytes: int = 0
    reserve_bytes: int = 0

    @property
    def kv_usage(self) -> float:
        return self.blocks_used / self.blocks_total if self.blocks_total else 0.0


class PlannerStats(msgspec.Struct, kw_only=True):
    """The planner's counters (``RedisKeys.PLANNER_STATS``), exported by the gateway's
    ``/metrics`` as ``kunserve:drops_total``, ``kunserve:restores_total``,
    ``kunserve:migrations_total``, ``kunserve:migrated_requests_total`` and
    ``kunserve:plan_seconds``."""

    drops_ok: int = 0  # groups formed (automatic and admin drops)
    drops_failed: int = 0  # drops started that left the members solo
    restores_ok: int = 0
    restores_failed: int = 0
    migrations_ok: int = 0  # the llumnix policy's live migrations of running requests
    migrations_failed: int = 0
    migrated_requests: int = 0  # requests those migrations moved
    plans: int = 0  # drop plans computed by the automatic planner
    plan_seconds_sum: float = 0.0  # time spent computing them


class InstanceInfo(msgspec.Struct, kw_only=True):
    instance_id: str
    state: str = "solo"  # solo | preparing | pipelined | restoring
    group_id: str = ""
    stage: int = 0
    layer_start: int = 0
    layer_end: int = 0


class Topology(msgspec.Struct, kw_only=True):
    epoch: int = 0
    instances: list[InstanceInfo] = []


# -- reconfiguration ---------------------------------------------------------------------------
class GroupPlan(msgspec.Struct, kw_only=True):
    """One group's reconfiguration as every member gets it."""

    epoch: int  # the topology epoch that announced the reconfiguration (names the group's link)
    group_id: str
    members: list[str]  # rank order: members[0] is the leader (stage 0)
    store_host: str  # the TCPStore the members meet at (the planner hosts it)
    store_port: int
    timeout_s: float = 30.0  # a member that does not answer within this fails the phase


class PrepareGroup(msgspec.Struct, tag=True, kw_only=True):
    plan: GroupPlan


class CommitGroup(msgspec.Struct, tag=True, kw_only=True):
    epoch: int
    group_id: str


class AbortGroup(msgspec.Struct, tag=True, kw_only=True):
    epoch: int
    group_id: str
    reason: str = ""


class RestoreGroup(msgspec.Struct, tag=True, kw_only=True):
    epoch: int  # the topology epoch that announced the restore
    group_id: str


class MigrateRequests(msgspec.Struct, tag=True, kw_only=True):
    """To both members of a prepared 2-member plan (the llumnix policy): members[0] hands
    running requests holding up to ``blocks`` KV blocks, with their KV, to members[1]."""

    epoch: int
    group_id: str
    blocks: int


ControlCommand = PrepareGroup | CommitGroup | AbortGroup | RestoreGroup | MigrateRequests


class ControlReply(msgspec.Struct, kw_only=True):
    instance_id: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0  # how long this member took for the phase
    # what the member measured (its phases' seconds; a migration's ``requests`` moved)
    figures: dict[str, float] = {}


class Reconfigure(msgspec.Struct, kw_only=True):
    """Admin command to the planner: merge ``instances`` (all live ones when empty) into one
    group, or split ``group`` back into solo instances."""

    action: str  # drop | restore
    instances: list[str] = []
    group: str = ""


class ReconfigureReply(msgspec.Struct, kw_only=True):
    ok: bool
    status: int = 200  # the HTTP status the gateway answers with (400, 409, 503 on failure)
    error: str | None = None
    code: str | None = None  # the error's code for the API (409: which conflict)
    epoch: int = 0
    group: str = ""
    phase_seconds: dict[str, float] = {}  # e.g. prepare, commit, restore
    moved_requests: int = 0  # a migration: the running requests it moved


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    return msgspec.json.decode(data, type=kind)
