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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kunserve.worker.block_manager import BlockManager
from kunserve.worker.request import Request, RequestStatus
from kunserve.worker.scheduler_output import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    num_micro_batches: int = 1  # outputs the caller keeps in flight (pipeline stages)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_since_step: list[str] = []
        self._capped: list[Request] = []  # finished by schedule() for want of any block
        # scheduled and not yet back through update_from_output
        self._in_flight: dict[str, Request] = {}
        self._orphans: set[str] = set()  # finished while in flight: their chunk is ignored

    # -- queue -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        if request.request_id in self._orphans:
            raise ValueError(f"request id {request.request_id!r} was aborted and its last "
                             "chunk is still in flight; use a new id")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (abort, stop string, error); frees its blocks. None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        if self._in_flight.pop(request_id, None) is not None:
            self._orphans.add(request_id)  # its chunk comes back ignored
        self.block_manager.free(request_id)
        self._finished_since_step.append(request_id)
        return request

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

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
        seats = self._seats()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens, seats)
        if budget is not None and not out.preempted:
            self._schedule_waiting(out, budget, seats)
        return out

    def _seats(self) -> int:
        """How many sequences this output may carry: all of them with one output in flight,
        an even share with ``num_micro_batches`` in flight."""
        live = min(len(self.requests), self.config.max_num_seqs)
        return -(-live // self.config.num_micro_batches)

    def _schedule_running(self, out: SchedulerOutput, budget: int, seats: int) -> int | None:
        """Serve running requests in order; the budget left, or None when one of them could
        not get its blocks (then nobody is admitted this step)."""
        index = 0
        while index < len(self.running) and budget > 0 and len(out.chunks) < seats:
            request = self.running[index]
            index += 1
            if request.request_id in self._in_flight:
                continue
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                # capped: its blocks went back, the queue may use them; preempted or waiting
                # for an in-flight request's blocks: nobody is admitted this step
                return budget if request.finished else None
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        total = request.num_computed_tokens + num_new
        while not self.block_manager.allocate(request.request_id, total):
            if self.running == [request]:
                self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                self._capped.append(request)
                return False
            victim = self._victim(request)
            if victim is None:
                return False
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _victim(self, request: Request) -> Request | None:
        """The most recently admitted running request not in flight; ``request`` itself when
        it is the newest; None when only in-flight requests are newer (wait for them)."""
        newer = self.running[self.running.index(request) + 1:]
        for candidate in reversed(newer):
            if candidate.request_id not in self._in_flight:
                return candidate
        return None if newer else request

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, seats: int) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.chunks) < seats):
            request = self.waiting[0]
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate(request.request_id,
                                               request.num_computed_tokens + num_new):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        self._in_flight[request.request_id] = request
        start = request.num_computed_tokens
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
        for chunk in out.chunks:
            if chunk.request_id in self._orphans:  # finished while the chunk ran
                self._orphans.discard(chunk.request_id)
                continue
            request = self._in_flight.pop(chunk.request_id, None)
            if request is None:
                raise ValueError(f"{chunk.request_id!r} has no chunk in flight: each output "
                                 "goes through update_from_output once, in schedule order")
            request.num_computed_tokens += chunk.num_tokens
            token = sampled.get(chunk.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            progressed.append((request, [token]))
            status = request.stop_status(self.config.max_model_len)
            if status is not None:
                self.finish_request(request.request_id, status)
        return progressed
