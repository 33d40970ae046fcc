"""Live migration of running requests between two solo instances (the llumnix policy).

Llumnix moves a request's KV while the request keeps decoding, then stops it only for what
changed meanwhile. Here, over the 2-member ``StageLink`` the planner prepared (rank 0 the
source, rank 1 the destination), both serving throughout:

1. copy while decoding: the source picks running requests (newest first, up to ``max_blocks``
   KV blocks), copies out their *full* blocks (every slot written: a full block never changes
   while its request runs) and sends them, one layer per tensor, with a ``MigrateOffer``;
   the destination receives them on a helper thread, then, between two of its steps, reserves
   blocks (held under a placeholder, so its scheduler cannot hand them out); its helper
   thread writes the KV there and answers. While the requests
   filled more blocks during a copy, the source copies those too, in another round (at most
   ``MAX_COPY_ROUNDS`` in all), as Llumnix does;
2. final stop: between two of its steps, the source stops the requests that still qualify
   (running, never preempted since they were chosen), keeps their blocks held until the
   answer, and sends their progress, generators and the KV of the blocks past the copied ones
   (the partly filled last block, and any filled during the last copy) with a
   ``MigrateFinal``; the destination takes them between two of its steps and answers. On a
   refusal or a broken link the source takes them back with their KV, which it never let go
   of; a destination that cannot send its answer drops them again before any step runs them
   (the source, or, if it died, the gateway's resubmission, serves them: never both, unless
   the answer was sent and the link broke before the source read it).

The engine thread drives it: ``wait`` runs on a helper thread (the link, and the copies out
of and into blocks no step touches), ``advance`` between two steps (scheduler and block
tables), until ``done``. A request is stopped only from the source's ``advance`` of stage 2 until the
destination's next ``advance``; the bytes copied during that stop are what decoded since the
last copy (``stop_blocks``), not the request's whole KV (``copied_blocks``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kunserve.worker.engine import LLMEngine
from kunserve.worker.handover import RequestState
from kunserve.worker.model_runner import ModelRunner
from kunserve.worker.pipeline.kv_transfer import pack_blocks, write_blocks
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError
from kunserve.worker.pipeline.stage_messages import MigrateAnswer, MigrateFinal, MigrateOffer
from kunserve.worker.request import RequestStatus

_HOLD = "migrating/"  # block-table key prefix of blocks held for a migration
MAX_COPY_ROUNDS = 4  # copies while decoding, at most, before the stop


@dataclass
class MigrationStats:
    requests: int = 0  # moved
    copied_blocks: int = 0  # sent while the requests decoded on (also of ones that then
    # finished or were preempted, and stayed)
    stop_blocks: int = 0  # sent while they were stopped
    held_blocks: int = 0  # source: what the moved requests held at the stop (copied or not)
    copy_s: float = 0.0  # source: from the copy's start to the destination's answer
    stop_s: float = 0.0  # source: from stopping the requests to the destination's answer
    started_at: float = field(default_factory=time.perf_counter)

    def phases(self) -> dict[str, float]:
        return {"migrate": time.perf_counter() - self.started_at, "copy": self.copy_s,
                "stop": self.stop_s, "requests": float(self.requests),
                "copied_blocks": float(self.copied_blocks),
                "stop_blocks": float(self.stop_blocks),
                "held_blocks": float(self.held_blocks)}


class MigrationSource:
    """Rank 0. Built between two steps: picks the requests and starts the copy."""

    def __init__(self, engine: LLMEngine, link: StageLink, max_blocks: int,
                 live: bool = True) -> None:
        """``live=False``: stop-and-copy (nothing copied ahead; ``kunserve bench migrate``
        compares the two)."""
        if engine.drain():  # a solo engine runs one step at a time: nothing is ever left here
            raise RuntimeError("migrate with steps in flight")
        self.link, self.stats, self.done = link, MigrationStats(), False
        self._stage = "copy"  # then "stop"
        self._stopped_at = 0.0
        self.moved: list[str] = []
        self._answer: MigrateAnswer | None = None
        self._states: list[RequestState] = []
        self._generators: dict[str, bytes] = {}
        self.copy_rounds = 0
        self._cache = engine.kv_caches[0]
        # what the next ``wait`` sends: a message and the blocks whose KV follows it
        self._outgoing: tuple[MigrateOffer | MigrateFinal, tuple[int, ...]] | None = None
        blocks, scheduler = engine.block_manager, engine.scheduler
        # request id -> (the blocks copied so far, its preemptions when chosen)
        self._copied: dict[str, tuple[list[int], int]] = {}
        total = 0
        for request in reversed(scheduler.running):  # newest first, as preemption
            table = blocks.block_table(request.request_id)
            if 0 < len(table) and total + len(table) <= max_blocks:
                self._copied[request.request_id] = ([], request.num_preemptions)
                total += len(table)
        # the instance is short of KV: its newest requests are the next preemption victims,
        # and a preempted one could not move any more
        scheduler.pinned.update(self._copied)
        self._live = live
        self._copy(engine)

    def wait(self) -> None:
        """Helper thread: send the copy (or the stop's rest), the destination answers. The
        blocks are read here, off the engine's thread: a copy's are full blocks of running
        requests, which no step writes (one freed and reused meanwhile belongs to a request
        that no longer moves, whose copy the destination drops); the stop's are held."""
        message, blocks = self._outgoing
        self._outgoing = None
        self.link.send_message(message, 1)
        if blocks:
            for tensor in pack_blocks(self._cache, blocks):
                self.link.send_tensor(tensor, 1)
        self.link.flush()
        self._answer = self.link.recv_message(MigrateAnswer, 1)

    def advance(self, engine: LLMEngine) -> None:
        """Between two steps: after a copy, copy what filled up meanwhile (while something
        did, up to ``MAX_COPY_ROUNDS``), else stop and send the rest; after that, finish."""
        answer, self._answer = self._answer, None
        assert answer is not None
        if self._stage == "copy":
            self.stats.copy_s = time.perf_counter() - self.stats.started_at
            if answer.error is not None:
                self._unpin(engine)
                self.done = True
            elif not (self._live and self.copy_rounds < MAX_COPY_ROUNDS and self._copy(engine)):
                self._stop(engine)
                self._stage = "stop"
            return
        self.stats.stop_s = time.perf_counter() - self._stopped_at
        self._release(engine, taken_back=answer.error is not None)
        self.done = True

    def _unpin(self, engine: LLMEngine) -> None:
        engine.scheduler.pinned.difference_update(self._copied)

    def _copy(self, engine: LLMEngine) -> bool:
        """Send the blocks of the chosen requests that are full and not copied yet (none
        when not ``live``: an empty offer); False, sending nothing, when a later round finds
        none."""
        scheduler, blocks = engine.scheduler, engine.block_manager
        more: dict[str, list[int]] = {}
        for rid in self._still(engine):
            done = self._copied[rid][0]
            full = scheduler.requests[rid].num_computed_tokens // blocks.block_size
            more[rid] = blocks.block_table(rid)[len(done):full] if self._live else []
        if self.copy_rounds and not any(more.values()):
            return False
        self.copy_rounds += 1
        ahead = tuple(b for table in more.values() for b in table)
        self._outgoing = (MigrateOffer(copied={r: len(b) for r, b in more.items()}), ahead)
        for rid, table in more.items():
            self._copied[rid][0].extend(table)
        self.stats.copied_blocks += len(ahead)
        return True

    def _still(self, engine: LLMEngine) -> list[str]:
        """The chosen requests that can still move: running, not preempted since they were
        chosen (their copied blocks are theirs and unchanged)."""
        scheduler, blocks = engine.scheduler, engine.block_manager
        still = []
        for rid, (copied, preemptions) in self._copied.items():
            request = scheduler.requests.get(rid)
            if (request is not None and request.status == RequestStatus.RUNNING
                    and request.num_preemptions == preemptions
                    and blocks.block_table(rid)[:len(copied)] == copied):
                still.append(rid)
        return still

    def abort(self, engine: LLMEngine) -> None:
        """The link broke: whatever was stopped serves on here."""
        self._release(engine, taken_back=True)
        self._unpin(engine)

    def _stop(self, engine: LLMEngine) -> None:
        if engine.drain():
            raise RuntimeError("migrate with steps in flight")
        self._stopped_at = time.perf_counter()
        blocks = engine.block_manager
        still = self._still(engine)
        runner = engine.runner
        assert isinstance(runner, ModelRunner)
        self._states = engine.export_requests(still)
        self._generators = runner.sampler.export_generators(still)
        # held until the answer: a refused request goes on here with its KV
        blocks.adopt({_HOLD + s.request_id: s.block_table for s in self._states})
        self.moved = [s.request_id for s in self._states]
        copied = {s.request_id: len(self._copied[s.request_id][0]) for s in self._states}
        rest = tuple(b for s in self._states for b in s.block_table[copied[s.request_id]:])
        self._outgoing = (MigrateFinal(requests=self._states, generators=self._generators,
                                       copied=copied), rest)
        self.stats.stop_blocks = len(rest)
        self.stats.held_blocks = sum(len(s.block_table) for s in self._states)

    def _release(self, engine: LLMEngine, taken_back: bool) -> None:
        self._unpin(engine)
        for state in self._states:
            engine.block_manager.free(_HOLD + state.request_id)
        if taken_back and self._states:
            runner = engine.runner
            assert isinstance(runner, ModelRunner)
            engine.adopt_requests(self._states, {s.request_id: s.block_table
                                                 for s in self._states})
            runner.sampler.import_generators(
                self._generators, {s.request_id: s.sampling_params for s in self._states})
            self.moved = []
        self.stats.requests = len(self.moved)
        self._states = []


class MigrationDestination:
    """Rank 1. Built between two steps; receives on the helper thread, takes over between
    steps."""

    def __init__(self, engine: LLMEngine, link: StageLink) -> None:
        self.link, self.stats, self.done = link, MigrationStats(), False
        self.moved: list[str] = []
        cache = engine.kv_caches[0]
        g = cache.geometry
        self._slot = (2, g.block_size, g.num_kv_heads, g.head_dim)
        self._layers, self._dtype = g.layers_held, cache.storage.dtype
        self._cache = cache
        self._message: MigrateOffer | MigrateFinal | None = None
        self._kv: list[torch.Tensor] = []
        self._reserved: dict[str, list[int]] = {}  # request id -> its blocks held here
        # a copy reserved between two steps, which the next ``wait`` writes and then
        # accepts: (blocks, KV)
        self._unwritten: tuple[tuple[int, ...], list[torch.Tensor]] | None = None

    def wait(self) -> None:
        """Helper thread: write the last copy into the blocks held for it (no step touches
        them) and accept it, so the source stops its requests only once their copy is in
        place; then receive the source's next message (a copy or the final stop) and the KV
        that follows it."""
        if self._unwritten is not None:
            write_blocks(self._cache, *self._unwritten)
            self._unwritten = None
            self.link.send_message(MigrateAnswer(), 0)
        message = self.link.recv_message(MigrateOffer | MigrateFinal, 0)
        if isinstance(message, MigrateOffer):
            count = sum(message.copied.values())
        else:
            count = sum(len(s.block_table) - message.copied[s.request_id]
                        for s in message.requests)
        self._kv = [self.link.recv_tensor((count, *self._slot), self._dtype, 0)
                    for _ in range(self._layers)] if count else []
        self._message = message

    def advance(self, engine: LLMEngine) -> None:
        kv, self._kv = self._kv, []
        message, self._message = self._message, None
        if isinstance(message, MigrateOffer):
            error, fresh = self._reserve(engine, message.copied)
            if error is not None:
                self.abort(engine)
                self.done = True
                self.link.send_message(MigrateAnswer(error=error), 0)
                return
            self._unwritten = (fresh, kv)  # written and accepted by the next ``wait``
            self.stats.copied_blocks += len(fresh)
            return
        assert message is not None
        error = self._take(engine, message, kv)
        self.done = True
        try:
            self.link.send_message(MigrateAnswer(error=error), 0)
        except StageLinkError:
            # the source may take them back: serving them here too would repeat their tokens
            # (if the source died instead, the gateway resubmits its requests)
            self._give_up(engine)
            raise

    def abort(self, engine: LLMEngine) -> None:
        for rid in self._reserved:
            engine.block_manager.free(_HOLD + rid)
        self._reserved = {}

    def _give_up(self, engine: LLMEngine) -> None:
        """Drop the requests just taken (their blocks go back), before any step ran them."""
        runner = engine.runner
        assert isinstance(runner, ModelRunner)
        engine.export_requests(self.moved)
        runner.sampler.export_generators(self.moved)
        self.moved, self.stats.requests = [], 0

    def _reserve(self, engine: LLMEngine, copied: dict[str, int]
                 ) -> tuple[str | None, tuple[int, ...]]:
        """Hold ``copied[rid]`` more blocks for each request (the first offer names every
        request); the error, or the new blocks in the order the source packed them."""
        blocks, scheduler = engine.block_manager, engine.scheduler
        new = [rid for rid in copied if rid not in self._reserved]
        if new and len(scheduler.running) + len(new) > scheduler.config.max_num_seqs:
            return "the destination runs as many requests as it may", ()
        if sum(copied.values()) + _headroom(engine) > blocks.num_free:
            return "the destination has no room", ()
        fresh: list[int] = []
        for rid, count in copied.items():
            held = self._reserved.setdefault(rid, [])
            blocks.allocate(_HOLD + rid, (len(held) + count) * blocks.block_size)
            table = blocks.block_table(_HOLD + rid)
            fresh += table[len(held):]
            self._reserved[rid] = list(table)
        return None, tuple(fresh)

    def _take(self, engine: LLMEngine, final: MigrateFinal, kv: list[torch.Tensor]
              ) -> str | None:
        """Adopt the stopped requests: each one's copied blocks, then new ones for the rest
        (in the order the source packed them)."""
        blocks, scheduler = engine.block_manager, engine.scheduler
        known = sorted(s.request_id for s in final.requests if s.request_id in scheduler.requests)
        if known:
            self.abort(engine)
            return f"the destination already serves request(s) {known}"
        new = sum(len(s.block_table) - final.copied[s.request_id] for s in final.requests)
        seqs = len(scheduler.running) + len(final.requests)
        if new + _headroom(engine) > blocks.num_free or seqs > scheduler.config.max_num_seqs:
            self.abort(engine)
            return "the destination has no room for the requests any more"
        tables, rest = {}, []
        for state in final.requests:
            rid = state.request_id
            held = len(self._reserved[rid])
            blocks.allocate(_HOLD + rid, len(state.block_table) * blocks.block_size)
            tables[rid] = list(blocks.block_table(_HOLD + rid))
            rest += tables[rid][held:]
        if kv:
            write_blocks(engine.kv_caches[0], tuple(rest), kv)
        self.abort(engine)  # every hold goes, the requests take their blocks
        runner = engine.runner
        assert isinstance(runner, ModelRunner)
        engine.adopt_requests(final.requests, tables)
        runner.sampler.import_generators(
            final.generators, {s.request_id: s.sampling_params for s in final.requests})
        self.moved = list(tables)
        self.stats.requests, self.stats.stop_blocks = len(tables), len(rest)
        return None


def _headroom(engine: LLMEngine) -> int:
    """Free blocks a destination keeps for its own requests: one each, so that taking others
    does not make it preempt one of its own at its next block."""
    return len(engine.scheduler.running)
