"""Drop, restore and fall back: one instance's engine changing shape between two steps.

Every function here runs on the engine's thread and is collective over the epoch's
``StageLink``: all members of the group call the same function. Each starts with nothing in
flight; a drop may end with one micro-batch in flight (the leader's own requests, below).

``drop``: the solo instances become one pipeline group. Each member exports its requests
(progress, block tables, detokenizer positions; ``handover.py``), keeps only its stage's layers
(``LlamaStage.narrow``: the other layers' tensors are freed with the old stage), re-reads its KV
range with the thinner geometry and grows into the freed bytes (``KVCache.reshape``), and the
members exchange the KV slices of the layers they no longer hold (``group_layout.drop_layout``,
``kv_transfer``). The leader adopts every request with its new block table and serves the
group (``LeaderRunner``); the others serve their stage (``StageRunner``), the last one with
the seeded generators of every request. With the epoch's second link, the exchange runs
beside the group: every member posts its sends and receives, the slices land on a helper
thread (``KVExchange``), and the leader holds the requests whose KV moves to it (their blocks
under a placeholder) until every member reports its slices written (``KVInPlace``, then
``complete_drop``). Its own requests are not held: the KV of its layers never moved, so one
micro-batch of all of them goes out during the drop, and every later stage waits for its
slices before running a micro-batch that uses blocks they land in
(``KVExchange.wait_landed``); meanwhile the leader steps no further (``waits_for_kv``). Their
first stage is usually computed already: members that get the commit first serve on solo
until the leader has entered the drop (``leader_entered``), and the leader, waiting for their
last step, runs it solo meanwhile (``_first_stage_ahead``), rather than during the exchange,
where it would take the cores from it. Moved requests go first: while their KV moves the
leader serves nothing else (a queued prefill would take the cores from the exchange and hold
their first micro-batch back; with none held and nothing in flight, the queued requests are
served at once). Then, until an output of each has come back, they split evenly over the
micro-batches (no lookahead meanwhile) and every micro-batch is capped at about the cost of
one of theirs (``_resume_cap``), so that none of their first tokens waits while the leader's
stage computes a queued prefill. The requests of the members that entered the drop first go
first: they have waited longest for a token.

``restore``: first every member pulls the layers it dropped from the peers that hold them
(``pull_layers``, over the epoch's second link, on a helper thread while the group keeps
serving; from the checkpoint if a peer fails), commits the pages of its KV range past the solo
blocks and tells the leader (``LayersPulled``). Then the leader stops serving, picks a member
for each request (``assign_requests``; it refuses when the group's KV does not fit the solo
instances), tells the chain (``BeginRestore``), the KV of each request is gathered on its
member (staged in those committed pages), and every member serves solo with its requests.

``fall_back``: the group broke (a peer died or hung). Whoever survives reloads the model from
the checkpoint and serves solo; the leader's requests go back to waiting and are recomputed from
their prompt plus the tokens they already produced, so none is lost and no token repeats.

Where its job ends: it does not decide when to reconfigure (the planner does) or talk to NATS
(the worker process does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import msgspec
import torch

from kunserve.worker import lookahead
from kunserve.worker.checkpoint import TORCH_DTYPES, build_stage, load_stage
from kunserve.worker.cost_model import CostModel
from kunserve.worker.engine import LLMEngine
from kunserve.worker.group_layout import (
    assign_requests,
    drop_layout,
    restore_pieces,
    solo_tables,
)
from kunserve.worker.handover import RequestState, import_request
from kunserve.worker.instance_memory import kv_geometry
from kunserve.worker.layer_range import LayerRange
from kunserve.worker.memory_budget import MemoryPlan, plan_memory
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.model_config import ModelConfig
from kunserve.worker.model_runner import ModelRunner
from kunserve.worker.pipeline.kv_transfer import (
    KVMove,
    MoveStats,
    lower_this_threads_priority,
    move_kv,
    return_pages,
    start_move,
)
from kunserve.worker.pipeline.leader_runner import LeaderRunner, StageAhead
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError, close_in_background
from kunserve.worker.pipeline.stage_messages import (
    BeginRestore,
    DropHello,
    DropWelcome,
    KVInPlace,
    LayersPulled,
    PullLayers,
    RestoreCommit,
    RestoredGenerators,
    RestoreDone,
)
from kunserve.worker.pipeline.stage_runner import StageRunner
from kunserve.worker.request import Request, RequestStatus
from kunserve.worker.request_sampler import RequestSampler
from kunserve.worker.scheduler_output import ScheduledChunk
from kunserve.worker.stage_executor import StageExecutor
from kunserve.worker.step_inputs import prepare_inputs

logger = logging.getLogger(__name__)


@dataclass
class Membership:
    """What a member of a pipeline group keeps while it serves in it."""

    link: StageLink
    group_id: str
    layers: LayerRange
    solo_memory: MemoryPlan  # to go back to
    stage_runner: StageRunner | None = None  # ranks 1..g-1
    # a second link of the same members, for pulling layers back while ``link`` serves
    layer_link: StageLink | None = None
    pulled: LlamaStage | None = None  # the whole model, pulled back for a restore
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    exchange: KVExchange | None = None  # a drop's KV exchange, running beside the group
    moved: MoveStats | None = None  # a drop's KV exchange that ran before serving
    params_release: ParamsRelease | None = None  # the dropped layers going back to the kernel
    # a member's requests, handed to the leader at the drop: lost with it if the group breaks
    handed_off: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.link.rank

    @property
    def kv_moved(self) -> MoveStats | None:
        """What the drop's KV exchange moved (None while an overlapped one runs)."""
        return self.exchange.stats if self.exchange is not None else self.moved


_HOLD = "exchanging/"  # block-table key prefix of a held request's blocks on the leader


class KVExchange:
    """The second half of a drop's KV exchange (``KVMove.finish``) on a helper thread beside
    the group, then the report to the leader: every member sends ``KVInPlace`` on the
    layer link, the leader's thread waits for all of them. ``on_done`` (any thread) is called
    once it is over, either way. On the leader, ``held`` are the requests whose KV is moving
    to it (they wait): ``complete_drop`` adopts them once it is over."""

    def __init__(self, move: KVMove, link: StageLink, held: list[RequestState],
                 phases: dict[str, float], on_done: Callable[[KVExchange], None] | None,
                 started_at: float, incoming: frozenset[int],
                 release: ParamsRelease) -> None:
        """``incoming``: the blocks (group numbering) this member receives slices into;
        ``release``: gives the move's staging back once it is over."""
        self.held = {s.request_id: s for s in held}
        self.incoming = incoming
        self.cancelled: set[str] = set()  # aborted while held: dropped, not adopted
        self.adopted = False
        self.stats: MoveStats | None = None
        self.error: str | None = None
        self._move, self._link, self._phases, self._on_done = move, link, phases, on_done
        self._release = release
        self._started_at = started_at  # the drop's (its ``total`` phase ends here)
        self._landed = threading.Event()  # this member's slices are written (or failed)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-exchange", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        link, move = self._link, self._move
        try:
            self.stats = move.finish()
            self._move = None
            self._landed.set()
            self._phases["exchange"] = self.stats.seconds
            if link.is_leader:
                for rank in range(1, link.size):
                    report = link.recv_message(KVInPlace, rank)
                    if report.error:
                        raise StageLinkError(f"rank {rank}: {report.error}")
            else:
                link.send_message(KVInPlace(), 0)
                link.flush()
            self._phases["total"] = time.perf_counter() - self._started_at
        except Exception as exc:  # noqa: BLE001 - the group cannot go on; the leader falls back
            self._move = None
            self.error = str(exc) or type(exc).__name__
            if not link.is_leader:
                try:
                    link.send_message(KVInPlace(error=self.error), 0)
                    link.flush()
                except StageLinkError:
                    pass
        finally:
            self._landed.set()
            self._done.set()
            if self._on_done is not None:
                self._on_done(self)
            self._release.run(move)  # last, off the path of the requests waiting

    def wait_landed(self, chunks: list[ScheduledChunk]) -> bool:
        """A member's stage, before it runs a micro-batch of ``chunks`` (the leader sends the
        first while the KV is still moving): when they use blocks this member receives
        slices into, wait until every slice is written (raises ``StageLinkError`` when that
        never happens). True once they all are: no need to ask again."""
        if not self._landed.is_set() and self.incoming.isdisjoint(
                b for c in chunks for b in c.block_table):
            return False
        self._landed.wait()
        if self.stats is None:
            raise StageLinkError(f"the drop's KV exchange failed: {self.error}")
        return True

    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """No more writes into the cache: a slice that arrives after this is dropped and the
        exchange fails (the group fell back; the cache is about to be solo again)."""
        move = self._move  # the thread drops it when it is done
        if move is not None:
            move.stop()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self, request_id: str) -> bool:
        """Leader: an abort of a held request (True if it was held and not adopted yet)."""
        if self.adopted or request_id not in self.held:
            return False
        self.cancelled.add(request_id)
        return True

    def unadopted(self) -> list[RequestState]:
        """Held requests that were neither adopted nor aborted."""
        if self.adopted:
            return []
        return [s for rid, s in self.held.items() if rid not in self.cancelled]


class ParamsRelease:
    """The dropped layers' memory (``params``, the move's staging) back to the kernel, at the
    lowest priority, once the exchange is over and this process has served a round of
    micro-batches after it (``round_size``: one per stage, so every member's moved requests
    have had their first token), or ``wait_s`` after the exchange at the latest (phase
    ``release``). Their pages go back first (``return_pages``, the GIL let go meanwhile):
    freeing the tensors alone left them in the C library's heap. The runners call ``served``
    after each micro-batch."""

    def __init__(self, phases: dict[str, float], round_size: int,
                 params: list[torch.Tensor] | None = None, wait_s: float = 1.0) -> None:
        self._phases, self._round_size, self._wait_s = phases, round_size, wait_s
        self._params = list(params or [])
        self.returned_bytes = 0  # whole pages of the dropped layers' storages given back
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._served: int | None = None  # micro-batches since the exchange ended
        self._round = threading.Event()
        if round_size <= 0:
            self._round.set()

    def served(self) -> None:
        if self._round.is_set():  # every micro-batch of the epoch calls this: keep it cheap
            return
        with self._lock:
            if self._served is None:  # the exchange still runs: not the round waited for
                return
            self._served += 1
            if self._served >= self._round_size:
                self._round.set()

    def run(self, move: KVMove) -> None:
        """On the calling thread (a helper's): wait for the round, then release."""
        with self._lock:
            self._served = 0
        lower_this_threads_priority()
        self._round.wait(self._wait_s)
        start = time.perf_counter()
        self.returned_bytes = return_pages(self._params)
        self._params = []
        move.release()
        self._phases["release"] = time.perf_counter() - start
        self.released.set()

    def start(self, move: KVMove) -> None:
        """``run`` on a thread of its own."""
        threading.Thread(target=self.run, args=(move,), name="kv-release", daemon=True).start()


# -- drop ---------------------------------------------------------------------------------------
def drop(engine: LLMEngine, link: StageLink, group_id: str,
         layer_link: StageLink | None = None,
         on_exchanged: Callable[[KVExchange], None] | None = None,
         overlap: bool = True) -> Membership:
    """Turn this solo engine into member ``link.rank`` of the group (collective).
    ``layer_link``: the same members' second link; with it (and ``overlap``) the KV exchange
    ends on a helper thread after this returns (``membership.exchange``; the leader sends
    one micro-batch of its own requests and nothing more until it is done, which
    ``on_exchanged`` signals, then calls ``complete_drop``), and ``pull_layers`` overlaps
    serving. Otherwise the exchange is over when this returns."""
    start, entered_at = time.perf_counter(), time.time()
    engine_outputs = engine.drain()
    if engine_outputs:  # a solo engine runs one step at a time: nothing is ever left here
        raise RuntimeError("drop with steps in flight")
    model, rank, size = engine.model_config, link.rank, link.size
    solo_memory, cache = engine.memory, engine.kv_caches[0]
    solo_runner = engine.runner
    assert isinstance(solo_runner, ModelRunner) and len(engine.stages) == 1
    layers = LayerRange.for_stage(rank, size, model.num_layers)
    stage = engine.stages[0].narrow(layers)
    ahead = None
    if not link.is_leader:
        link.announce("drop")
    else:
        link.announce("leader")  # members serve on solo until then (``leader_entered``)
        if (link.arrivals("drop") or 0) < size - 1:  # a member is still in its solo step
            ahead = _first_stage_ahead(engine, stage)  # before the export: tables may grow
    geometry = kv_geometry(engine.config, model, layers.size)
    plan = plan_memory(solo_memory.budget_bytes, stage.parameter_bytes(),
                       solo_memory.reserve_bytes, geometry)
    capacity = min(plan.num_blocks, cache.capacity_bytes // geometry.block_bytes)
    states = engine.export_requests()
    generators = solo_runner.sampler.export_generators()
    hello = DropHello(rank=rank, capacity_blocks=capacity, solo_blocks=solo_memory.num_blocks,
                      tables={s.request_id: s.block_table for s in states}, requests=states,
                      generators=generators, entered_at=entered_at)
    try:
        welcome, requests = _agree_on_drop(link, hello, model.num_layers)
    except (DropRefused, StageLinkError):  # nothing changed yet: take the requests back
        engine.adopt_requests(states, hello.tables)
        solo_runner.sampler.import_generators(
            generators, {s.request_id: s.sampling_params for s in states})
        raise
    layout = drop_layout(model.num_layers, welcome.tables, welcome.capacities)
    phases = {"handover": time.perf_counter() - start}
    # the tensors of the layers this member no longer holds stage the KV it sends, then go;
    # only memory torch's allocator owns (the checkpoint loader copies every tensor out of
    # its file): the first write to a private mapping of a file is a copy-on-write fault
    # (~30x a plain write here, slower than fresh memory)
    kept = {t.untyped_storage().data_ptr() for t in stage.state_dict().values()}
    staging = [p.data for p in engine.stages[0].parameters()
               if p.untyped_storage().data_ptr() not in kept  # tied weights stay untouched
               and p.untyped_storage().resizable()]
    # free: from here on only ``staging`` refers to the layers this member no longer holds
    engine.stages, solo_runner = [stage], None
    engine.runner = None  # type: ignore[assignment]  # the old runner held the whole model
    memory = replace(plan, num_blocks=layout.num_blocks)
    executor = StageExecutor(stage, cache)
    membership = Membership(link, group_id, layers, solo_memory, phases=phases,
                            layer_link=layer_link,
                            handed_off=[] if link.is_leader else [s.request_id for s in states])
    # the leader owns every request from here on (the others get none): if the group breaks,
    # it recomputes them. Of those whose KV moved, the ready ones can run once their first
    # stage's KV is in place on the leader: its own at once (the KV of its layers stayed),
    # every one without an overlap (the exchange is over when the group serves); the rest
    # wait for the overlapped exchange (held)
    overlap = overlap and layer_link is not None
    moved = [msgspec.structs.replace(s, block_table=list(layout.tables[s.request_id]))
             for s in requests if layout.tables[s.request_id]]
    # the blocks this member receives slices into
    incoming = frozenset(b for p in layout.pieces if p.dst == rank != p.src
                         for b in p.dst_blocks)
    ready = [s for s in moved if not overlap or incoming.isdisjoint(s.block_table)]
    held = [s for s in moved if overlap and not incoming.isdisjoint(s.block_table)]
    release = ParamsRelease(phases, round_size=size, params=staging)
    membership.params_release = release
    if link.is_leader:
        engine.install(LeaderRunner(executor, link, depth=size, ahead=ahead,
                                    served=release.served), memory)
        if ahead is not None:
            phases["first_stage_ahead"] = ahead.seconds
        moving = {s.request_id for s in held}
        engine.adopt_requests([s for s in requests if s.request_id not in moving],
                              layout.tables)
        _hold(engine, held)  # after: its headroom blocks must not be any adopted one's
        _cap_while_held(engine, ready, held)
    else:
        engine.install(None, memory)
    phases["free"] = time.perf_counter() - start - phases["handover"]
    try:
        move = start_move(cache, layer_link if overlap else link, rank, layout.pieces, geometry,
                          layout.num_blocks, layers.start, staging)
        del staging  # the move keeps what it still uses, the release all of it
        if overlap:
            membership.exchange = KVExchange(move, layer_link, held, phases, on_exchanged,
                                             start, incoming, release)
        else:
            membership.moved = move.finish()
            phases["exchange"] = membership.moved.seconds
            release.start(move)
    except StageLinkError as exc:
        fall_back(engine, membership, held)
        raise GroupFailed(f"the group broke during the KV exchange: {exc}") from None
    if ready and membership.exchange is not None:
        _start_ready(engine, membership)
    if not link.is_leader:
        sampler = None
        if link.is_last:
            sampler = RequestSampler(cache.storage.device)
            sampler.import_generators(welcome.generators, welcome.generator_params)
        membership.stage_runner = StageRunner(
            link, executor, model, sampler,
            landed=membership.exchange.wait_landed if membership.exchange else None,
            served=release.served)
    if not overlap:
        phases["total"] = time.perf_counter() - start
    return membership


def leader_entered(link: StageLink) -> bool:
    """Member, before ``drop``: whether the leader has entered it. A member that gets there
    first serves on solo until it has (its requests get a token rather than wait), and the
    leader, waiting for the member's step, runs its own requests' first stage meanwhile
    (``_first_stage_ahead``). True when the store cannot tell."""
    if link.is_leader:
        return True
    entered = link.arrivals("leader")
    return entered is None or entered > 0


def _first_stage_ahead(engine: LLMEngine, stage: LlamaStage) -> StageAhead | None:
    """Leader, at a drop, while members are still finishing their last solo step: run the
    first stage (``stage``, its layers of the solo model) of the next decode of every running request here, solo, and
    keep the hidden states for the group's first micro-batch (``LeaderRunner``). Its keys
    and values land in the solo cache, in the bytes the group's cache re-reads as this
    stage's blocks (a block for the new token is added to the request's table first, when
    it needs one and one is free). The leader's own requests then go out without waiting
    for their first stage, which no longer competes with the KV exchange for the cores."""
    start = time.perf_counter()
    blocks, chunks = engine.block_manager, []
    for request in engine.scheduler.running:
        rid = request.request_id
        if request.num_uncomputed_tokens != 1 or not blocks.allocate(rid, request.num_tokens):
            continue  # in its prefill, or no block free for its token
        position = request.num_tokens - 1
        chunks.append(ScheduledChunk(rid, request.token_slice(position, position + 1), position,
                                     list(blocks.block_table(rid)), True,
                                     request.sampling_params, []))
    if not chunks:
        return None
    cache = engine.kv_caches[0]
    inputs = prepare_inputs(chunks, cache.geometry.block_size)
    cache.commit_through(inputs.max_block)
    with torch.inference_mode():
        layers = stage.layer_range
        hidden = stage(inputs.input_ids, inputs.positions,
                       cache.layer_caches()[layers.start:layers.end], inputs.meta)  # (N, H)
    return StageAhead(hidden, {c.request_id: (c.start_position, c.token_ids[0], row)
                               for row, c in enumerate(inputs.chunks)},
                      time.perf_counter() - start)


def _cap_while_held(engine: LLMEngine, ready: list[RequestState],
                    held: list[RequestState]) -> None:
    """Leader, at a drop: while ``held`` wait for their KV nothing else runs (a queued
    prefill would take the cores from the exchange), but one micro-batch of every ``ready``
    request, whose first stage runs on the leader while the KV moves and whose later stages
    wait on each member for its slices (``KVExchange.wait_landed``). With none held, the ready
    ones start as moved requests do (``complete_drop``)."""
    scheduler = engine.scheduler
    ids = [s.request_id for s in ready]  # (one still in its prefill gets the cap's tokens)
    if held and ready:
        scheduler.cap_tokens(_decode_cap(engine, ready), ids, outputs=1)
    elif held:
        scheduler.cap_tokens(0)
    elif ready:
        scheduler.cap_tokens(_resume_cap(engine, ready), ids)


def _start_ready(engine: LLMEngine, membership: Membership) -> None:
    """Leader, at a drop: send the micro-batch of its own requests; their first stage runs
    here while the KV moves. When none can go (no block for a token), nothing goes out until
    ``complete_drop``: a later step would send it and then wait for the members' slices."""
    try:
        sent = engine.fill()
    except StageLinkError as exc:  # the exchange holds the requests still waiting for KV
        fall_back(engine, membership)
        raise GroupFailed(f"the group broke at its first micro-batch: {exc}") from None
    if not sent:
        engine.scheduler.cap_tokens(0)


def waits_for_kv(engine: LLMEngine, membership: Membership | None) -> bool:
    """Leader: no step now. The micro-batch of its own requests that went out at the drop is
    in flight while the drop's KV still moves: taking it back would wait for the members'
    slices (the engine thread would block), and the requests whose KV comes to the leader
    could not go out meanwhile. ``complete_drop`` ends it."""
    exchange = membership.exchange if membership is not None else None
    return exchange is not None and not exchange.adopted and engine.num_in_flight > 0


def _hold(engine: LLMEngine, held: list[RequestState]) -> None:
    """Leader: keep the blocks of requests whose KV is moving (their group block tables)
    from the scheduler, with one more free block each, so that the newer requests the group
    serves meanwhile leave room for their next token."""
    blocks = engine.block_manager
    blocks.adopt({_HOLD + s.request_id: s.block_table for s in held})
    for state in held:  # best effort: with no free block left the headroom is smaller
        blocks.allocate(_HOLD + state.request_id,
                        (len(state.block_table) + 1) * blocks.block_size)
    engine.resume_detokenizers(held)  # an abort or a fallback finds them like the others


def _resume_cap(engine: LLMEngine, held: list[RequestState]) -> int:
    """Leader: the token cap per micro-batch until an output of each of ``held`` (whose KV
    has just landed) has come back: a micro-batch then costs about what one of their decode
    micro-batches does, so none of them waits behind a queued prefill of up to
    ``max_num_batched_tokens``, neither to go out nor to come back (the leader's thread
    computes the first stage of every micro-batch). At least ``lookahead_min_tokens``, and
    room for a share's decodes: a micro-batch carries one share of them (``Scheduler._seats``),
    and with less room some would not go out in their share's micro-batch and the first
    round would take more micro-batches. By the cost model, or by the model's FLOPs when it
    has none."""
    return _decode_cap(engine, held[:-(-len(held) // engine.scheduler.config.num_micro_batches)])


def _decode_cap(engine: LLMEngine, states: list[RequestState]) -> int:
    """A micro-batch's token cap that costs about as much as one decode of each of
    ``states`` (at least ``lookahead_min_tokens``, and room for those decodes)."""
    model = engine.cost_model or CostModel.estimate(engine.model_config)
    decodes = lookahead.cost([lookahead.Work(s.request_id, len(s.prompt_token_ids)  # prefix
                                             + len(s.output_token_ids) - 1, 1) for s in states],
                             model)
    fits = lookahead.tokens_within(model, decodes, engine.config.max_num_batched_tokens)
    return max(fits, len(states), engine.config.lookahead_min_tokens)


def cancel_held(engine: LLMEngine, exchange: KVExchange, request_id: str) -> bool:
    """Leader: an abort of a request held for its KV (True if it was held and not adopted
    yet). Once none is left held, the rest of the group's work no longer waits (the leader
    still takes nothing back while the micro-batch of its own requests that went out at the
    drop waits for the members' slices: ``waits_for_kv``)."""
    cancelled = exchange.cancel(request_id)
    if cancelled and not exchange.unadopted():
        engine.scheduler.cap_tokens(None)
    return cancelled


def complete_drop(engine: LLMEngine, membership: Membership) -> list[str]:
    """Leader, between two steps, once ``membership.exchange`` is done (it waits otherwise):
    the held requests join the scheduler, ahead of those it took meanwhile. Returns their ids.
    When the exchange failed, falls back to solo (every request requeued) and raises
    ``GroupFailed``. Does nothing when there is nothing to complete."""
    exchange = membership.exchange
    if exchange is None or exchange.adopted:
        return []
    exchange.wait()
    if exchange.error is not None:
        fall_back(engine, membership)
        raise GroupFailed(f"the group broke during the KV exchange: {exchange.error}")
    blocks = engine.block_manager
    for rid in exchange.held:
        blocks.free(_HOLD + rid)
    states = exchange.unadopted()
    engine.adopt_requests(states, {s.request_id: s.block_table for s in states}, first=True)
    exchange.adopted = True
    scheduler = engine.scheduler
    if states:  # and the ready ones not back yet, if any went out while the KV moved
        scheduler.cap_tokens(_resume_cap(engine, states),
                             [s.request_id for s in states] + sorted(scheduler.capped_until))
    elif scheduler.token_budget == 0:  # (a one-output cap is spent by now, or was dropped)
        scheduler.cap_tokens(None)  # the held ones were all aborted: nothing to wait for
    if exchange.cancelled:  # the last rank forgets their generators with the next batch
        engine.runner.release(sorted(exchange.cancelled))
    return [s.request_id for s in states]


class GroupFailed(RuntimeError):
    """The group broke (a peer died or hung) during a reconfiguration; this member serves
    solo again (``fall_back``), the leader with every request requeued."""


def _agree_on_drop(link: StageLink, own: DropHello,
                   num_layers: int) -> tuple[DropWelcome, list[RequestState]]:
    """Members send their hello to the leader; it answers everyone with what every member
    needs to derive the same KV layout (or why the group cannot form, and then everyone stays
    as it was). Returns the welcome and, on the leader, every request of the group."""
    if not link.is_leader:
        link.send_message(own, 0)
        welcome = link.recv_message(DropWelcome, 0)
        if welcome.error:
            raise DropRefused(welcome.error)
        return welcome, []
    hellos = [own] + [link.recv_message(DropHello, r) for r in range(1, link.size)]
    welcome = DropWelcome(tables=[h.tables for h in hellos],
                          capacities=[h.capacity_blocks for h in hellos])
    try:
        drop_layout(num_layers, welcome.tables, welcome.capacities)
    except ValueError as exc:
        welcome.error = str(exc)
    solo_blocks = sum(h.solo_blocks for h in hellos)
    if welcome.error is None and min(welcome.capacities) <= solo_blocks:
        # every member holds the group's block count: with an uneven split the member with
        # the most layers bounds it (e.g. 5 layers over 4 members: stage 0 holds 2)
        welcome.error = (f"the group would hold {min(welcome.capacities)} blocks, no more than "
                         f"its {len(hellos)} members hold solo ({solo_blocks}): dropping "
                         f"{num_layers} layers over {len(hellos)} instances gains no KV cache")
    requests = longest_waiting_first(hellos)
    generators = {rid: state for h in hellos for rid, state in h.generators.items()}
    params = {s.request_id: s.sampling_params for s in requests}
    for rank in range(1, link.size):
        message = welcome
        if rank == link.last_rank and welcome.error is None:
            message = msgspec.structs.replace(
                welcome, generators=generators,
                generator_params={r: params[r] for r in generators})
        link.send_message(message, rank)
    link.flush()
    if welcome.error:
        raise DropRefused(welcome.error)
    return welcome, requests


def longest_waiting_first(hellos: list[DropHello]) -> list[RequestState]:
    """The group's requests in the order the leader serves them after the drop: those of
    the members that entered it first have waited longest for a token, so they go first
    (into the first micro-batch), whatever the members' ranks; each member's in its order.
    ``entered_at`` is each member's wall clock: on one host exact; across hosts as close as
    their clocks are (NTP: about a millisecond, against entries up to a solo step apart)."""
    return [s for h in sorted(hellos, key=lambda h: h.entered_at) for s in h.requests]


class DropRefused(RuntimeError):
    """The members cannot form the group (their KV does not fit it); each stays solo with
    its requests."""


# -- restore ------------------------------------------------------------------------------------
def plan_restore(engine: LLMEngine, membership: Membership) -> BeginRestore:
    """Leader: pick each request's member (call it after ``engine.drain()``, whose outputs
    the caller publishes, to plan the real restore; before it, to check early). Raises
    ``ValueError`` (and changes nothing) when the group's KV does not fit the solo
    instances."""
    link = membership.link
    blocks = engine.block_manager
    needed = {rid: len(blocks.block_table(rid)) for rid in engine.scheduler.requests}
    assignment = assign_requests(needed, link.size, membership.solo_memory.num_blocks)
    return BeginRestore(requests=[], assignment=assignment)


def order_layer_pull(membership: Membership) -> None:
    """Leader: tell every member to start ``pull_layers`` (on the layer link)."""
    link = membership.layer_link
    assert link is not None and link.is_leader
    for rank in range(1, link.size):
        link.send_message(PullLayers(), rank)
    link.flush()


def await_layer_pull_order(membership: Membership) -> None:
    """Member: block until the leader orders the pull (raises when the link closes)."""
    assert membership.layer_link is not None
    membership.layer_link.recv_message(PullLayers, 0, idle=True)


def pull_layers_when_ordered(engine: LLMEngine, membership: Membership) -> LlamaStage:
    """Member, on a helper thread while its stage serves: wait for the leader's order, then
    ``pull_layers``."""
    await_layer_pull_order(membership)
    if membership.exchange is not None:  # the layer link is the exchange thread's until it
        membership.exchange.wait()        # ends (the order can come right after KVInPlace)
    return pull_layers(engine, membership)


def pull_layers(engine: LLMEngine, membership: Membership) -> LlamaStage:
    """The whole model again, from this member's layers and its peers' (collective over the
    layer link; blocking: run it on a helper thread while the group serves). When a peer
    fails, from the checkpoint on disk. On the leader it returns once every member has
    reported its layers in place, so the group stops serving only to move the KV (not to
    wait for a slower member's pull)."""
    start = time.perf_counter()
    model, config = engine.model_config, engine.config
    link = membership.layer_link or membership.link
    try:
        stage = _pull_layers(engine.stages[0], model, TORCH_DTYPES[config.dtype], link)
    except StageLinkError as exc:
        logger.warning("pulling layers from the peers failed (%s): loading the checkpoint",
                       exc)
        stage = load_stage(config.model, LayerRange.full(model.num_layers), config.dtype)
    membership.phases["restore_layers"] = time.perf_counter() - start
    # the restore stages its KV exchange past the solo blocks: commit those pages now, while
    # the group still serves, not in the middle of the exchange
    cache = engine.kv_caches[0]
    cache.populate(_solo_kv_bytes(engine, membership), cache.capacity_bytes)
    try:
        if link.is_leader:
            for rank in range(1, link.size):
                link.recv_message(LayersPulled, rank)
        else:
            link.send_message(LayersPulled(), 0)
            link.flush()
    except StageLinkError as exc:  # the restore itself will find the group broken
        logger.warning("a member's layer pull was not confirmed: %s", exc)
    return stage


def restore(engine: LLMEngine, membership: Membership, begin: BeginRestore,
            stage: LlamaStage | None = None) -> None:
    """Split the group: every member gets the whole model back and serves the requests
    ``begin.assignment`` gives it (collective). The leader passes the ``BeginRestore`` of
    ``plan_restore`` after ``engine.drain()``; the others the one their stage runner
    returned. ``stage``: the whole model from ``pull_layers`` (None: every member pulls over
    the serving link now). Members take their requests only once the leader has heard that
    every member has its layers and KV (``RestoreCommit``), so a request is never served twice;
    if the group breaks before that, every member falls back to solo and the leader requeues
    every request (``GroupFailed``)."""
    start = time.perf_counter()
    link, rank = membership.link, membership.link.rank
    exchange = membership.exchange
    if exchange is not None:  # over everywhere (the leader completed the drop):
        if link.is_leader and not exchange.adopted:
            raise ValueError("complete_drop before restoring: requests are still held")
        exchange.wait()       # its thread may still be returning
    if link.is_leader:
        begin.requests = engine.export_requests()
    try:
        if link.is_leader:
            link.send_message(begin, 1)
        model, config = engine.model_config, engine.config
        if stage is None:
            stage = _pull_layers(engine.stages[0], model, TORCH_DTYPES[config.dtype], link)
            membership.phases["restore_layers"] = time.perf_counter() - start
        group_tables = {s.request_id: s.block_table for s in begin.requests}
        new_tables = solo_tables(group_tables, begin.assignment)
        pieces = restore_pieces(model.num_layers, link.size, group_tables, begin.assignment,
                                new_tables)
        solo, cache = membership.solo_memory, engine.kv_caches[0]
        # the packed and received slices go to the free blocks past the solo blocks' bytes,
        # committed by ``pull_layers`` (into fresh buffers, page faults made a 4-member
        # restore's exchange take 210-450 ms here, 47-93 ms staged); the solo cache then gives
        # those pages back
        used = {b for table in group_tables.values() for b in table}
        solo_bytes = _solo_kv_bytes(engine, membership)
        moved = move_kv(cache, link, rank, pieces, kv_geometry(config, model, model.num_layers),
                        solo.num_blocks, 0, cache.spare_regions(used, solo_bytes))
        cache.release(solo_bytes)
        membership.phases["restore_exchange"] = moved.seconds
        generators = _return_generators(membership, begin)
        _commit_restore(link)
    except StageLinkError as exc:
        if link.is_leader:  # the requests are the leader's until the commit
            _requeue(engine, [import_request(s) for s in begin.requests])
        fall_back(engine, membership)
        raise GroupFailed(f"the group broke during the restore: {exc}") from None
    mine = [s for s in begin.requests if begin.assignment[s.request_id] == rank]
    engine.stages = [stage]
    runner = ModelRunner(engine.stages, engine.kv_caches)
    runner.sampler.import_generators(generators,
                                     {s.request_id: s.sampling_params for s in mine})
    engine.install(runner, solo)
    engine.adopt_requests(mine, {s.request_id: new_tables[s.request_id] for s in mine})
    close_in_background(membership.link, membership.layer_link)  # serve solo meanwhile
    membership.phases["restore_total"] = time.perf_counter() - start


def _solo_kv_bytes(engine: LLMEngine, membership: Membership) -> int:
    """Bytes of the KV range the solo blocks take once the group is restored."""
    geometry = kv_geometry(engine.config, engine.model_config, engine.model_config.num_layers)
    return membership.solo_memory.num_blocks * geometry.block_bytes


def _commit_restore(link: StageLink) -> None:
    """Members report their layers and KV in place; the leader then tells each to serve."""
    if link.is_leader:
        for rank in range(1, link.size):
            link.recv_message(RestoreDone, rank)
        for rank in range(1, link.size):
            link.send_message(RestoreCommit(), rank)
    else:
        link.send_message(RestoreDone(), 0)
        link.recv_message(RestoreCommit, 0)
    link.flush()


def _close(membership: Membership) -> None:
    membership.link.close()
    if membership.layer_link is not None:
        membership.layer_link.close()


def _pull_layers(own_stage: LlamaStage, model: ModelConfig, dtype: torch.dtype,
                 link: StageLink) -> LlamaStage:
    """The whole model from this member's stage and the peers' (each sends its tensors to
    every other member, in name order; shapes come from the model config)."""
    own = own_stage.model_state()
    for peer in range(link.size):
        if peer != link.rank:
            for name in sorted(own):
                link.send_tensor(own[name], peer)
    state = dict(own)
    for peer in range(link.size):
        if peer == link.rank:
            continue
        with torch.device("meta"):
            shapes = LlamaStage(model, LayerRange.for_stage(peer, link.size, model.num_layers),
                                dtype).model_state()
        for name in sorted(shapes):
            state[name] = link.recv_tensor(tuple(shapes[name].shape), dtype, peer)
    link.flush()
    return build_stage(model, LayerRange.full(model.num_layers), dtype, state)


def _return_generators(membership: Membership, begin: BeginRestore) -> dict[str, bytes]:
    """The last rank hands each member the seeded streams of the requests it takes."""
    link = membership.link
    if not link.is_last:
        return link.recv_message(RestoredGenerators, link.last_rank).generators
    runner = membership.stage_runner
    assert runner is not None and runner.sampler is not None
    everything = runner.sampler.export_generators()
    for rank in range(link.size - 1):
        link.send_message(RestoredGenerators(generators={
            rid: state for rid, state in everything.items()
            if begin.assignment.get(rid) == rank}), rank)
    link.flush()
    return {rid: state for rid, state in everything.items()
            if begin.assignment.get(rid) == link.rank}


# -- the group broke ----------------------------------------------------------------------------
def fall_back(engine: LLMEngine, membership: Membership,
              held: list[RequestState] | None = None) -> int:
    """Serve solo again after the group broke: reload the whole model from the checkpoint,
    re-read the KV range with the solo geometry, and put this engine's requests (the leader's:
    the group's, including those a drop still held, ``held`` or its exchange's) back in the
    queue to be recomputed from prompt plus output so far. Returns how many requests it
    requeued."""
    exchange = membership.exchange
    if exchange is not None:  # it must not write into the cache once it is solo again, and
        exchange.stop()          # the layer link is its own until it ends
        membership.link.close()
        if not exchange.wait(exchange_timeout(membership)):  # stopped: it writes no more
            logger.error("the KV exchange of group %s did not end", membership.group_id)
        held = [*(held or []), *exchange.unadopted()]
        exchange.adopted = True
    _close(membership)
    model, config = engine.model_config, engine.config
    requests = engine.abandon_requests() + [import_request(s) for s in held or []]
    engine.stages = [load_stage(config.model, LayerRange.full(model.num_layers), config.dtype)]
    cache = engine.kv_caches[0]
    solo = membership.solo_memory
    cache.reshape(kv_geometry(config, model, model.num_layers), solo.num_blocks, 0)
    engine.install(ModelRunner(engine.stages, engine.kv_caches), solo)
    _requeue(engine, requests)
    return len(requests)


def exchange_timeout(membership: Membership) -> float:
    """How long an exchange's helper can wait for a silent peer before its link gives up."""
    link = membership.layer_link or membership.link
    return 2 * link.timeout.total_seconds() + 1


def _requeue(engine: LLMEngine, requests: list[Request]) -> None:
    """Queue requests whose KV is gone, to be recomputed from prompt plus output so far."""
    for request in requests:
        request.status, request.num_computed_tokens = RequestStatus.WAITING, 0
        request.num_preemptions += 1
        engine.scheduler.adopt(request)
