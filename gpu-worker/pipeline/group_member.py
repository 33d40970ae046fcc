"""Joining a pipeline group: load this rank's layer range and agree on the group's KV blocks.

Rank ``r`` of ``g`` holds ``LayerRange.for_stage(r, g, L)`` and a paged KV cache for those
layers. Block ids mean the same tokens on every rank (one block table per request, made by the
leader's scheduler), so every rank needs the same block count: members tell the leader how many
their budget holds (``MemberHello``), the leader answers with the smallest, or with the count
the caller imposes (``GroupWelcome``). The job ends at a ready ``StageExecutor``; serving is
``leader_runner.py``'s and ``stage_runner.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kunserve.worker.checkpoint import TORCH_DTYPES, load_stage
from kunserve.worker.engine import EngineConfig
from kunserve.worker.instance_memory import (
    kv_geometry,
    model_parameter_bytes,
    plan_instance_memory,
)
from kunserve.worker.kv_cache import KVCache
from kunserve.worker.layer_range import LayerRange
from kunserve.worker.memory_budget import MemoryPlan
from kunserve.worker.model import paged_decode
from kunserve.worker.model_config import ModelConfig
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError, frame_bytes_for
from kunserve.worker.pipeline.stage_messages import GroupWelcome, MemberHello
from kunserve.worker.stage_executor import StageExecutor


def activation_frame_bytes(model_dir: str, dtype: str) -> int:
    """The frame every member of a group serving this checkpoint in this dtype uses, so that
    a decode micro-batch's hidden states travel inside its frame (``frame_bytes_for``)."""
    return frame_bytes_for(ModelConfig.from_dir(model_dir).hidden_size,
                           TORCH_DTYPES[dtype].itemsize)


@dataclass
class GroupMember:
    executor: StageExecutor
    memory: MemoryPlan  # this member's budget split; ``num_blocks`` is the group's


def join_group(config: EngineConfig, model: ModelConfig, link: StageLink,
               num_blocks: int | None = None) -> GroupMember:
    """Load this rank's stage, agree on the block count, allocate the KV cache.

    ``num_blocks`` (leader only; None: the smallest member's capacity) imposes the group's
    block count, as a drop plan does."""
    layers = LayerRange.for_stage(link.rank, link.size, model.num_layers)
    stage = load_stage(config.model, layers, dtype=config.dtype)
    paged_decode.available()  # build or load the fused kernel now, not on the first decode
    plan = plan_instance_memory(config, model, stage.parameter_bytes(), layers.size,
                                whole_model_bytes=model_parameter_bytes(model, config.dtype))
    hello = MemberHello(rank=link.rank, layer_start=layers.start, layer_end=layers.end,
                        num_layers=model.num_layers, block_size=config.block_size,
                        dtype=config.dtype, capacity_blocks=plan.num_blocks)
    agreed = _lead_agreement(link, hello, num_blocks) if link.is_leader else _follow(link, hello)
    cache = KVCache(kv_geometry(config, model, layers.size), agreed, TORCH_DTYPES[config.dtype])
    return GroupMember(StageExecutor(stage, cache), replace(plan, num_blocks=agreed))


def _follow(link: StageLink, hello: MemberHello) -> int:
    link.send_message(hello, 0)
    welcome = link.recv_message(GroupWelcome, 0)
    if welcome.error:
        raise StageLinkError(f"epoch {link.epoch}: the leader refused rank {link.rank}: "
                             f"{welcome.error}")
    return welcome.num_blocks


def _lead_agreement(link: StageLink, own: MemberHello, num_blocks: int | None) -> int:
    hellos = [own] + [link.recv_message(MemberHello, r) for r in range(1, link.size)]
    error = _check_members(hellos, link.size)
    capacity = min(h.capacity_blocks for h in hellos)
    agreed = capacity if num_blocks is None else num_blocks
    if error is None and agreed > capacity:
        error = (f"the group needs {agreed} KV blocks but its smallest member holds "
                 f"{capacity}")
    for rank in range(1, link.size):
        link.send_message(GroupWelcome(num_blocks=agreed, error=error), rank)
    link.flush()
    if error:
        raise StageLinkError(f"epoch {link.epoch}: the group cannot form: {error}")
    return agreed


def _check_members(hellos: list[MemberHello], size: int) -> str | None:
    """Why these members do not make one model split in ``size`` stages, if they do not."""
    first = hellos[0]
    for rank, hello in enumerate(hellos):
        expected = LayerRange.for_stage(rank, size, first.num_layers)
        if hello.rank != rank or (hello.layer_start, hello.layer_end) != (expected.start,
                                                                           expected.end):
            return (f"rank {hello.rank} holds layers [{hello.layer_start}, {hello.layer_end}),"
                    f" stage {rank} of {size} must hold [{expected.start}, {expected.end})")
        if (hello.num_layers, hello.block_size, hello.dtype) != (
                first.num_layers, first.block_size, first.dtype):
            return (f"rank {rank} runs {hello.num_layers} layers, block size "
                    f"{hello.block_size}, {hello.dtype}; rank 0 runs {first.num_layers}, "
                    f"{first.block_size}, {first.dtype}")
    return None
