"""The plain-data messages between the ranks of one pipeline group (msgspec, over
``StageLink``; never NATS).

Joining (``group_member.py``)::

    rank r -> 0     MemberHello     its layer range, geometry and how many blocks it can hold
    0 -> rank r     GroupWelcome    the group's block count (or why the group cannot form)

Serving, per micro-batch ``seq`` (``leader_runner.py``, ``stage_runner.py``)::

    r -> r+1        StageBatch      the scheduled chunks, forwarded byte for byte
    r -> r+1        hidden states   tensor (N, H) of the model dtype, N = total chunk tokens
    last -> 0       SampledTokens   one token per sampling chunk, in ``prepare_inputs`` order

Ending the epoch::

    r -> r+1        StopPipeline    each rank appends its busy seconds and forwards it
    last -> 0       PipelineStopped everyone's busy seconds: the epoch ended cleanly
"""

from __future__ import annotations

import msgspec

from kunserve.worker.scheduler_output import ScheduledChunk


class MemberHello(msgspec.Struct, tag=True, kw_only=True):
    rank: int
    layer_start: int
    layer_end: int
    num_layers: int
    block_size: int
    dtype: str
    capacity_blocks: int  # what this member's budget holds for its layers


class GroupWelcome(msgspec.Struct, tag=True, kw_only=True):
    num_blocks: int = 0
    error: str | None = None


class StageBatch(msgspec.Struct, tag=True, kw_only=True):
    seq: int  # micro-batch number in this epoch, from 0
    chunks: list[ScheduledChunk]
    # requests that left the engine since the previous batch: the last stage drops their
    # generators before sampling this batch
    finished: list[str] = []


class StopPipeline(msgspec.Struct, tag=True, kw_only=True):
    busy_seconds: list[float] = []  # per rank so far, rank order


class SampledTokens(msgspec.Struct, tag=True, kw_only=True):
    seq: int
    token_ids: list[int]


class PipelineStopped(msgspec.Struct, tag=True, kw_only=True):
    busy_seconds: list[float]  # per rank, rank order


# what rank r receives from rank r-1
StageMessage = StageBatch | StopPipeline
# what the leader receives from the last rank
LeaderMessage = SampledTokens | PipelineStopped
