"""The worker process's settings, read at the process edge (flags or ``KUNSERVE_*`` variables).

``engine_config()`` hands the engine its own slice as a plain ``EngineConfig``.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator

from kunserve.settings import ServiceSettings
from kunserve.sizes import parse_size


def default_instance_id() -> str:
    """``<hostname>-<pid>``, with dots (FQDNs) made NATS-subject safe."""
    return f"{socket.gethostname().split('.')[0] or 'worker'}-{os.getpid()}"


def _size_or_none(value: object) -> object:
    if value is None or value == "":
        return None
    return parse_size(value) if isinstance(value, str | int) else value


class WorkerSettings(ServiceSettings):
    instance_id: str = Field(default_factory=default_instance_id)
    model: str  # Hugging Face checkpoint directory
    # the instance's memory budget ("64MiB", "2GiB", bytes); None: parameters take 40% (CPU)
    memory_per_instance: Annotated[int | None, BeforeValidator(_size_or_none)] = None
    # or: the budget is the whole model's parameters plus this many times as much KV cache
    # (KUNSERVE_KV_TO_PARAMETERS=0.33: a model that fills most of its memory)
    kv_to_parameters: float | None = Field(None, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(128, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    threads: int = Field(1, ge=1)  # torch intra-op threads: workers share the host's cores
    load_refresh_ms: int = Field(50, ge=1)  # load written at most this often while busy
    liveness_ttl_ms: int = Field(2000, ge=30)  # load key expiry; refreshed every ttl/3
    # the refresh goes on through a long step (a 2,048-token prefill of a larger model on a
    # CPU: seconds) but stops when a step or command has run this long: presumed hung
    engine_stall_s: float = Field(30.0, gt=0)
    drain_timeout_s: float = Field(5.0, ge=0)  # on stop: in-flight requests get this long
    # policies.py: infercept swaps preempted KV to host memory, the others recompute it
    policy: str = "kunserve"
    # host memory for swapped KV under the infercept policy ("512MiB"); None: as much as
    # the KV cache
    swap_space: Annotated[int | None, BeforeValidator(_size_or_none)] = None
    # where this worker's pipeline-group sockets listen (peers must reach it); "": the
    # interface the host name resolves to (containers)
    bind_host: str = "127.0.0.1"
    # the time slice (µs) asked of the kernel for the groups' socket threads, so that a frame
    # moves as soon as it arrives while the cores compute (Linux 6.12+); 0: the kernel's
    io_slice_us: int = Field(100, ge=0)

    @field_validator("instance_id")
    @classmethod
    def _subject_safe(cls, value: str) -> str:
        if not value or any(c in value for c in ". *>\t\r\n"):
            raise ValueError(f"instance_id {value!r} must be non-empty, without dots, spaces, "
                             "'*' or '>' (it is part of NATS subjects)")
        return value

    def engine_config(self):
        from kunserve.worker.engine import EngineConfig

        return EngineConfig(model=self.model, dtype=self.dtype,
                            memory_per_instance=self.memory_per_instance,
                            kv_to_parameters=self.kv_to_parameters,
                            block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            max_model_len=self.max_model_len, num_threads=self.threads,
                            swap_bytes=self._swap_bytes())

    def _swap_bytes(self) -> int:
        from kunserve.policies import get_policy

        if not get_policy(self.policy).swap:
            return 0
        return -1 if self.swap_space is None else self.swap_space
