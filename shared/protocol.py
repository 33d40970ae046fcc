"""The wire schema: every NATS message and Redis record of the mesh, in one place.

Messages are msgspec structs encoded as JSON. One subject per message kind (see ``Subjects``).
NATS carries control messages, requests and token deltas only; activations and KV bytes go
worker-to-worker over torch.distributed (DESIGN §1).

Request flow::

    gateway --GenerateRequest--> kunserve.generate            (router queue group)
    router  --GenerateRequest--> kunserve.worker.<id>.generate (instance_id filled in)
    worker  --RequestUpdate----> kunserve.updates.<request_id> (accepted, then one per step)
    gateway --AbortRequest-----> kunserve.abort                (every worker; the owner acts)
"""

from __future__ import annotations

import time
from typing import TypeVar

import msgspec

T = TypeVar("T")


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


class RedisKeys:
    """Load is written by each worker, reservations by routers, topology by the planner."""

    INSTANCES = "kunserve:instances"  # set of instance ids ever registered
    TOPOLOGY = "kunserve:topology"  # JSON Topology, owned by the planner

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
    num_preemptions: int = 0
    epoch: int = 0
    updated_at: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.blocks_used / self.blocks_total if self.blocks_total else 0.0


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


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    return msgspec.json.decode(data, type=kind)
