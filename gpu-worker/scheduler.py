"""Continuous batching with chunked prefill, FCFS admission and recompute preemption.

Each step gets a token budget. Running requests are served first (a decode costs one token, an
unfinished prefill continues with as many tokens as the budget allows); then waiting requests
are admitted in arrival order while the budget, ``max_num_seqs`` and free blocks allow. When a
running request needs a block and none is free, the most recently admitted running request is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed
from its prompt plus the tokens it has generated. Pure Python: no torch.

Micro-batches in flight (a pipeline group): ``schedule`` may be called again before the
previous output came back through ``update_from_output``. A request whose chunk is in flight
is skipped (its next chunk depends on that one's result) and is never a preemption victim (its
blocks are being written by later stages); a running request that needs blocks only an
in-flight request could free waits for it instead. With ``num_micro_batches = n`` each output
takes at most ``ceil(live sequences / n)`` of them, so ``n`` outputs in flight carry similar
work; with ``n = 1`` (one process holding the whole model) nothing of this applies.

Lookahead (a pipeline group with a cost model, ``lookahead.py``): while prefill work is queued
(waiting requests, or running ones with more than one known token to compute), an output is
the first of the ``n`` micro-batches of equal estimated cost that the next ``n`` outputs'
worth of work (``n * max_num_batched_tokens`` tokens, running requests first, then the queue
in order) splits into; it is recomputed for every output, so it follows whatever came back in
between. The cut may chunk a prefill, and the rest of that prefill may go out in the next
output while the first part is still in flight: every stage runs micro-batches in the order
they were sent, so its keys and values are written before the next chunk reads them. Only
known tokens go ahead this way (a chunk that samples is always a request's last); a request
with a chunk in flight is still never preempted. With no prefill queued (decodes only)
outputs are formed as without lookahead.

A token cap (``cap_tokens``) lowers every output's budget for a while (0: nothing goes out;
or only so many outputs, each of every running request). A group's leader uses it around a
drop: one micro-batch of its own requests and nothing else while the KV of the requests it
took over is moving, then small micro-batches, splitting those requests evenly (lookahead
waits), until an output of each of them has come back, so none is stuck behind a queued
prefill: neither scheduled after it nor, its micro-batch on its way through the later stages,
waiting while the first stage (the leader's own thread) computes it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass

from kunserve.worker import lookahead
from kunserve.worker.block_manager import BlockManager
from kunserve.worker.cost_model import CostModel
from kunserve.worker.request import Request, RequestStatus
from kunserve.worker.scheduler_output import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    num_micro_batches: int = 1  # outputs the caller keeps in flight (pipeline stages)
    # lookahead micro-batching (with num_micro_batches > 1); None: even shares of sequences
    cost_model: CostModel | None = None
    lookahead_min_tokens: int = 32  # a lookahead cut leaves at least this many tokens a side
    # preemption by swapping (InferCept's answer): host blocks a preempted request's KV is
    # copied to and back from; 0: preemption recomputes (vLLM's default)
    swap_blocks: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # the last schedule held a request back for want of free KV blocks (the head of the
        # queue, a swapped or running one short of blocks, a preemption): the planner's sign
        # that memory, not the step's budget, keeps the queue waiting (``InstanceLoad``)
        self.kv_bound = False
        self._finished_since_step: list[str] = []
        self._capped: list[Request] = []  # finished by schedule() for want of any block
        # scheduled and not yet back through update_from_output: the requests, how many of
        # their chunks and tokens (more than one chunk only with lookahead)
        self._in_flight: dict[str, Request] = {}
        # requests a live migration is copying out: never preemption victims (the copy would
        # be wasted); a request short of blocks waits instead of preempting one of them
        self.pinned: set[str] = set()
        self._flying_chunks: Counter[str] = Counter()
        self._flying_tokens: Counter[str] = Counter()
        self._orphans: Counter[str] = Counter()  # finished in flight: chunks to ignore
        # lookahead: the micro-batches planned after the one that went out, kept until an
        # output comes back or a request leaves
        self._plan: deque[list[lookahead.Work]] = deque()
        # swap preemption: host blocks, and the requests whose KV sits there (resumed first)
        self.host_blocks = (BlockManager(config.swap_blocks, block_manager.block_size)
                            if config.swap_blocks else None)
        self.swapped: deque[Request] = deque()
        self.num_swaps = 0  # swap-outs so far
        # a lower token budget per output (``cap_tokens``), the requests it waits for, and
        # how many outputs may still go out under it (None: any number)
        self._token_cap: int | None = None
        self._cap_until: set[str] | None = None
        self._cap_outputs: int | None = None

    # -- token cap ---------------------------------------------------------------------------
    def cap_tokens(self, tokens: int | None, until_back: Collection[str] = (),
                   outputs: int | None = None) -> None:
        """Give every output at most ``tokens`` tokens (0: schedule nothing; None:
        ``max_num_batched_tokens`` again). With ``until_back``, the cap ends by itself once
        an output of each of those requests has come back through ``update_from_output`` (or
        none of them is here and running any more). With ``outputs``, only that many outputs
        go out under it, each with every running request that fits (no even split, no queued
        request), then nothing until the next call."""
        if tokens is not None and tokens < 0:
            raise ValueError(f"a token cap must be at least 0, got {tokens}")
        if outputs is not None and (tokens is None or outputs < 0):
            raise ValueError("a number of outputs needs a token cap and is at least 0")
        self._token_cap = tokens
        self._cap_until = set(until_back) if tokens is not None and until_back \
            else None
        self._cap_outputs = outputs
        self._plan.clear()

    @property
    def capped_until(self) -> frozenset[str]:
        """The requests the cap waits for to come back (empty: none)."""
        return frozenset(self._cap_until or ())

    @property
    def token_budget(self) -> int:
        """Tokens one output may carry now."""
        limit = self.config.max_num_batched_tokens
        if self._cap_outputs == 0:
            return 0
        return limit if self._token_cap is None else min(limit, self._token_cap)

    def _count_cap(self, out: SchedulerOutput | None = None) -> None:
        """Strike the requests the cap waits for that came back in ``out``, that are gone or
        no longer running (preempted: they start over, nothing to wait for); lift it when
        none is left."""
        if self._cap_until is None:
            return
        self._cap_until = {rid for rid in self._cap_until if rid in self.requests
                           and self.requests[rid].status == RequestStatus.RUNNING}
        if out is not None:
            self._cap_until -= {c.request_id for c in out.chunks}
        if not self._cap_until:
            self.cap_tokens(None)

    # -- queue -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        if request.request_id in self._orphans:
            raise ValueError(f"request id {request.request_id!r} was aborted and its last "
                             "chunk is still in flight; use a new id")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def adopt(self, request: Request) -> None:
        """Take over a request another engine started (its blocks are already adopted by
        the block manager): running ones go on running, after the ones here."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        if request.status == RequestStatus.RUNNING:
            self.running.append(request)
        else:
            self.waiting.append(request)

    def adopt_all(self, requests: list[Request], first: bool = False) -> None:
        """``adopt`` each, in order; ``first``: ahead of every request here (they were
        admitted earlier), so a newer request is preempted before any of them."""
        if not first:
            for request in requests:
                self.adopt(request)
            return
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(rid in self.requests for rid in ids):
            raise ValueError("adopted request ids repeat or are already in the engine")
        self.requests.update(zip(ids, requests, strict=True))
        self.running[0:0] = [r for r in requests if r.status == RequestStatus.RUNNING]
        self.waiting.extendleft(reversed([r for r in requests
                                          if r.status != RequestStatus.RUNNING]))
        self._plan.clear()

    def forget_plan(self) -> None:
        """Requests left by other means than ``finish_request``: plan lookahead afresh."""
        self._plan.clear()

    def take_finished(self) -> list[str]:
        """Requests that ended since the last ``schedule`` (their runner state can go)."""
        finished, self._finished_since_step = self._finished_since_step, []
        return finished

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (abort, stop string, error); frees its blocks. None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._plan.clear()
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.swapped:
            self.swapped.remove(request)
            self.host_blocks.free(request_id)
        request.status = status
        if self._in_flight.pop(request_id, None) is not None:
            # its chunks come back ignored
            self._orphans[request_id] = self._flying_chunks.pop(request_id)
            del self._flying_tokens[request_id]
        self.block_manager.free(request_id)
        self._finished_since_step.append(request_id)
        return request

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def is_in_flight(self, request_id: str) -> bool:
        return request_id in self._in_flight

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- schedule ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished_since_step)
        self._finished_since_step = []
        self._count_cap()
        piece = self._lookahead()
        allowed = None if piece is None else {w.request_id: w.num_tokens for w in piece}
        seats = self._seats() if allowed is None else self.config.max_num_seqs
        budget = self._schedule_running(out, self.token_budget, seats, allowed)
        self.kv_bound = budget is None or bool(out.preempted)
        if self._cap_outputs is not None:  # the running requests alone
            self._cap_outputs -= bool(out.chunks)
            return out
        if budget is not None and not out.preempted:
            budget = self._schedule_swapped(out, budget, seats)
            self.kv_bound = budget is None
        if budget is not None and not out.preempted and not self.swapped:
            self._schedule_waiting(out, budget, seats, allowed)
        if piece is not None and [(c.request_id, c.start_position, c.num_tokens)
                                  for c in out.chunks] != [(w.request_id, w.prefix, w.num_tokens)
                                                           for w in piece]:
            self._plan.clear()  # it did not go out as planned (blocks): plan afresh
        return out

    def _seats(self) -> int:
        """How many sequences this output may carry: all of them with one output in flight,
        an even share with ``num_micro_batches`` in flight: of every request here, or while
        a cap waits for requests (a drop's moved requests, see ``cap_tokens``) of the
        running ones, so that those split evenly over the first outputs and the first of
        them comes back as soon as it can (the queue waits for them anyway); while a cap
        limits the number of outputs, every running request."""
        live = len(self.running) if self._cap_until else len(self.requests)
        live = min(live, self.config.max_num_seqs)
        if self._cap_outputs is not None:
            return live
        return -(-live // self.config.num_micro_batches)

    def _unscheduled(self, request: Request) -> int:
        """Known tokens of the request that are neither computed nor in flight."""
        return (request.num_uncomputed_tokens
                - self._flying_tokens.get(request.request_id, 0))

    # -- lookahead ---------------------------------------------------------------------------
    def _lookahead(self) -> list[lookahead.Work] | None:
        """This output's work by lookahead, or None (no cost model, one micro-batch in
        flight, no prefill queued, or a cap waiting for requests to come back, whose even
        shares ``_seats`` gives: serve as without lookahead). The next micro-batch of the
        plan while nothing came back since it was made, else the first of a new one."""
        config = self.config
        if (config.cost_model is None or config.num_micro_batches < 2 or self._cap_until
                or self._cap_outputs is not None):
            return None
        if self._plan and self._plan_holds(self._plan[0]):
            return self._plan.popleft()
        self._plan.clear()
        if not (self.waiting or any(self._unscheduled(r) > 1 for r in self.running)):
            return None
        window = self._lookahead_window(config.num_micro_batches * self.token_budget)
        self._plan.extend(lookahead.split(window, config.num_micro_batches, config.cost_model,
                                          config.lookahead_min_tokens))
        return (lookahead.truncate(self._plan.popleft(), self.token_budget)
                if self._plan else [])

    def _plan_holds(self, piece: list[lookahead.Work]) -> bool:
        """Each chunk of a planned micro-batch still starts where its request's scheduled
        work ends, and the micro-batch fits one output."""
        for w in piece:
            request = self.requests.get(w.request_id)
            if (request is None or w.num_tokens > self._unscheduled(request)
                    or w.prefix != request.num_tokens - self._unscheduled(request)):
                return False
        return lookahead.num_tokens(piece) <= self.token_budget

    def _lookahead_window(self, limit: int) -> list[lookahead.Work]:
        """Up to ``limit`` tokens of work in serving order: running requests' known tokens
        not in flight, then the queue's while seats and free blocks last (FCFS). Nothing is
        allocated here."""
        window: list[lookahead.Work] = []
        free = self.block_manager.num_free
        for request in self.running:
            num_new = min(self._unscheduled(request), limit)
            if num_new <= 0:
                continue
            start = request.num_tokens - self._unscheduled(request)
            free -= self.block_manager.num_new_blocks(request.request_id, start + num_new)
            window.append(lookahead.Work(request.request_id, start, num_new))
            limit -= num_new
        seats = self.config.max_num_seqs - len(self.running)
        for request in self.waiting:
            num_new = min(request.num_uncomputed_tokens, limit)
            needed = self.block_manager.blocks_needed(num_new)
            if num_new <= 0 or seats <= 0 or needed > free:
                break
            free -= needed
            seats -= 1
            window.append(lookahead.Work(request.request_id, 0, num_new))
            limit -= num_new
        return window

    # -- serving -----------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput, budget: int, seats: int,
                          allowed: dict[str, int] | None = None) -> int | None:
        """Serve running requests in order; the budget left, or None when one of them could
        not get its blocks (then nobody is admitted this step). ``allowed``: tokens per
        request (lookahead); else every request not in flight, as many as the budget takes."""
        index = 0
        while index < len(self.running) and budget > 0 and len(out.chunks) < seats:
            request = self.running[index]
            index += 1
            if allowed is not None:
                num_new = min(allowed.get(request.request_id, 0), budget)
                if num_new <= 0:
                    continue
            elif request.request_id in self._in_flight:
                continue
            else:
                num_new = min(request.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                # capped: its blocks went back, the queue may use them; preempted or waiting
                # for an in-flight request's blocks: nobody is admitted this step
                return budget if request.finished else None
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        total = request.num_tokens - self._unscheduled(request) + num_new
        if request.request_id in self._in_flight:  # lookahead: never preempt around it
            return self.block_manager.allocate(request.request_id, total)
        while not self.block_manager.allocate(request.request_id, total):
            if self.running == [request]:
                if self._blocks_held_elsewhere():  # they come back: wait for them
                    return False
                self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                self._capped.append(request)
                return False
            victim = self._victim(request)
            if victim is None:
                return False
            self.running.remove(victim)
            self._preempt(victim, out)
            out.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _blocks_held_elsewhere(self) -> bool:
        """Blocks taken by tables that are no request of this scheduler: a drop holding the
        blocks of requests whose KV is on its way, a migration's copies. They come back, so a
        request alone and short of blocks waits instead of being cut short."""
        mine = sum(len(self.block_manager.block_table(rid)) for rid in self.requests)
        return self.block_manager.usage().used > mine

    def _victim(self, request: Request) -> Request | None:
        """The most recently admitted running request neither in flight nor pinned;
        ``request`` itself when it is the newest (and not pinned); None when only in-flight or
        pinned requests are newer (wait for them)."""
        newer = self.running[self.running.index(request) + 1:]
        for candidate in reversed(newer):
            if candidate.request_id not in self._in_flight and (
                    candidate.request_id not in self.pinned):
                return candidate
        return None if newer or request.request_id in self.pinned else request

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, seats: int,
                          allowed: dict[str, int] | None = None) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.chunks) < seats):
            request = self.waiting[0]
            num_new = min(request.num_uncomputed_tokens, budget)
            if allowed is not None:
                num_new = min(allowed.get(request.request_id, 0), num_new)
            if num_new <= 0:
                break
            if not self.block_manager.allocate(request.request_id,
                                               request.num_computed_tokens + num_new):
                self.kv_bound = True
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free a running request's blocks: its KV is swapped out to host blocks when there
        is room (it resumes where it was), else it is recomputed from the start."""
        rid = request.request_id
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        table = self.block_manager.block_table(rid)
        host = self.host_blocks
        if host is not None and table and host.allocate(rid, len(table) * host.block_size):
            out.swap_out += list(zip(table, host.block_table(rid), strict=True))
            self.block_manager.free(rid)
            self.num_swaps += 1
            self.swapped.appendleft(request)
            return
        self.block_manager.free(rid)
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)

    def _schedule_swapped(self, out: SchedulerOutput, budget: int, seats: int) -> int | None:
        """Bring swapped requests back, oldest preemption last (FCFS among them), while their
        blocks fit: their KV is copied in before this step's forward. The budget left, or
        None when the first of them does not fit (nobody overtakes it)."""
        while self.swapped and budget > 0 and len(out.chunks) < seats and len(
                self.running) < self.config.max_num_seqs:
            request = self.swapped[0]
            rid = request.request_id
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate(rid, request.num_computed_tokens + num_new):
                return None
            host_table = self.host_blocks.block_table(rid)
            device_table = self.block_manager.block_table(rid)
            out.swap_in += list(zip(host_table, device_table, strict=False))
            self.host_blocks.free(rid)
            self.swapped.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        return budget

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_tokens - self._unscheduled(request)
        self._in_flight[request.request_id] = request
        self._flying_chunks[request.request_id] += 1
        self._flying_tokens[request.request_id] += num_new
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_slice(start, start + num_new),
            start_position=start,
            block_table=list(self.block_manager.block_table(request.request_id)),
            samples=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            # a snapshot, and only when penalties read it
            output_token_ids=(list(request.output_token_ids)
                              if request.sampling_params.has_penalties else []),
            num_output_tokens=request.num_output_tokens,
        )

    # -- update ------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput,
                           sampled: dict[str, int]) -> list[tuple[Request, list[int]]]:
        """Advance progress counters, append sampled tokens and finish requests that hit a
        token-level stop (EOS, stop token, max_tokens, max_model_len). With several outputs
        in flight, call it once per output in the order ``schedule`` made them.

        Returns ``(request, new_token_ids)`` for every request that got a token this step, and
        ``(request, [])`` for one that ``schedule`` finished because it outgrew the cache.
        """
        progressed: list[tuple[Request, list[int]]] = [(r, []) for r in self._capped]
        self._capped = []
        if out.chunks:
            self._plan.clear()  # decodes came back: they go into the next plan
        for chunk in out.chunks:
            rid = chunk.request_id
            if self._orphans[rid] > 0:  # finished while the chunk ran
                self._orphans[rid] -= 1
                if not self._orphans[rid]:
                    del self._orphans[rid]
                continue
            request = self._in_flight.get(rid)
            if request is None or chunk.start_position != request.num_computed_tokens:
                raise ValueError(f"{rid!r} has no chunk in flight starting at "
                                 f"{chunk.start_position}: each output goes through "
                                 "update_from_output once, in schedule order")
            self._flying_chunks[rid] -= 1
            self._flying_tokens[rid] -= chunk.num_tokens
            if not self._flying_chunks[rid]:
                del self._in_flight[rid], self._flying_chunks[rid], self._flying_tokens[rid]
            request.num_computed_tokens += chunk.num_tokens
            token = sampled.get(chunk.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            progressed.append((request, [token]))
            status = request.stop_status(self.config.max_model_len)
            if status is not None:
                self.finish_request(request.request_id, status)
        self._count_cap(out)
        return progressed
