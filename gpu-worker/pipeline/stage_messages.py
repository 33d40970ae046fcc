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

Dropping parameters (``reconfigure.py``: solo instances become the group)::

    rank r -> 0     DropHello       its block tables, requests, generators, capacity
    0 -> rank r     DropWelcome     every member's tables and capacity (each derives the same
                                    KV layout), the generators for the last rank
    then KV slices (``kv_transfer.py``), one layer per tensor: over the serving link while
    the group is not serving, or over the second link while it serves, and then
    r -> 0          KVInPlace       on the second link: member r wrote every slice it received
                                    (or why it could not); the leader then runs the requests

Restoring (the group splits back into solo instances)::

    0 -> r          PullLayers      on the epoch's second link, while the group serves: then
    all <-> all     parameters      each rank's tensors to every other rank, name order
    r -> 0          LayersPulled    member r has the whole model (the leader waits for every
                                    member before it stops serving)
    r -> r+1        BeginRestore    which member each request goes to (forwarded down the chain)
    then KV slices, then
    last -> r       RestoredGenerators  the seeded streams of the requests member r takes
    r -> 0          RestoreDone     layers and KV in place
    0 -> r          RestoreCommit   every member is ready: serve solo (before it, a broken
                                    group leaves every request with the leader)

Migrating requests between two solo instances (the llumnix policy, ``migration.py``), in
two stages while both serve::

    0 -> 1          MigrateOffer    how many full blocks of each request are copied now
    then those blocks' KV, every layer, one layer per tensor
    1 -> 0          MigrateAnswer   the destination reserved blocks for them, or why it cannot
                    (again while the requests filled blocks during the copy)
    0 -> 1          MigrateFinal    the requests (progress, block tables, generators), stopped
    then the KV of their blocks past the copied ones, one layer per tensor
    1 -> 0          MigrateAnswer   the destination serves them now, or why it cannot
"""

from __future__ import annotations

import msgspec

from kunserve.worker.handover import RequestState
from kunserve.worker.sampling_params import SamplingParams
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


class DropHello(msgspec.Struct, tag=True, kw_only=True):
    rank: int
    capacity_blocks: int  # blocks of its stage's geometry its budget holds after the drop
    solo_blocks: int  # blocks it holds solo
    tables: dict[str, list[int]]  # its requests' solo block tables
    requests: list[RequestState]
    generators: dict[str, bytes]  # seeded requests' random-stream states
    # ``time.time()`` when it entered the drop, just after its last solo step: its requests
    # have waited for a token since then
    entered_at: float = 0.0
    error: str | None = None  # why this member cannot join (the group then fails)


class DropWelcome(msgspec.Struct, tag=True, kw_only=True):
    tables: list[dict[str, list[int]]] = []  # per rank
    capacities: list[int] = []  # per rank
    generators: dict[str, bytes] = {}  # for the last rank only
    generator_params: dict[str, SamplingParams] = {}
    error: str | None = None


class PullLayers(msgspec.Struct, tag=True, kw_only=True):
    """On the layer link: start pulling the dropped layers back (while the group serves)."""


class KVInPlace(msgspec.Struct, tag=True, kw_only=True):
    """On the layer link, after a drop's exchange: this member wrote every KV slice it
    received (``error``: it could not; the group is broken)."""

    error: str | None = None


class LayersPulled(msgspec.Struct, tag=True, kw_only=True):
    """On the layer link: this member has the whole model again."""


class BeginRestore(msgspec.Struct, tag=True, kw_only=True):
    requests: list[RequestState]  # block tables in the group's numbering
    assignment: dict[str, int]  # request id -> the rank it lives on once solo


class RestoredGenerators(msgspec.Struct, tag=True, kw_only=True):
    generators: dict[str, bytes]


class MigrateOffer(msgspec.Struct, tag=True, kw_only=True):
    """Source -> destination (the llumnix policy): the requests it will move, with how many
    more of each one's blocks (full ones: they no longer change) are copied now, while it goes
    on decoding them. The first offer names every request."""

    copied: dict[str, int] = {}


class MigrateAnswer(msgspec.Struct, tag=True, kw_only=True):
    error: str | None = None


class MigrateFinal(msgspec.Struct, tag=True, kw_only=True):
    """The final stop: the requests that still move (stopped at the source; a request that
    finished or was preempted meanwhile stays), their generators, and how many of each one's
    blocks the copy already carried; the KV of the rest follows."""

    requests: list[RequestState] = []
    generators: dict[str, bytes] = {}
    copied: dict[str, int] = {}


class RestoreDone(msgspec.Struct, tag=True, kw_only=True):
    """A member has the whole model and its requests' KV: it waits for the commit."""


class RestoreCommit(msgspec.Struct, tag=True, kw_only=True):
    """The leader heard every member: serve solo now."""


# what rank r receives from rank r-1
StageMessage = StageBatch | StopPipeline | BeginRestore
# what the leader receives from the last rank
LeaderMessage = SampledTokens | PipelineStopped
