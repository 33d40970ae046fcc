"""Continuous batching with chunked prefill, FCFS admission and recompute preemption.

Each step gets a token budget. Running requests are served first (a decode costs one token, an
unfinished prefill continues with as many tokens as the budget allows); then waiting requests
are admitted in arrival order while the budget, ``max_num_seqs`` and free blocks allow. When a
running request needs a block and none is free, the most recently admitted running request is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed
from its prompt plus the tokens it has generated. Pure Python: no torch.
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

    # -- queue -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
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
        self.block_manager.free(request_id)
        self._finished_since_step.append(request_id)
        return request

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- schedule ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished_since_step)
        self._finished_since_step = []
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                break  # the request itself was preempted: everyone after it already was
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        total = request.num_computed_tokens + num_new
        while not self.block_manager.allocate(request.request_id, total):
            if self.running == [request]:
                self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                self._capped.append(request)
                return False
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
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
        token-level stop (EOS, stop token, max_tokens, max_model_len).

        Returns ``(request, new_token_ids)`` for every request that got a token this step, and
        ``(request, [])`` for one that ``schedule`` finished because it outgrew the cache.
        """
        progressed: list[tuple[Request, list[int]]] = [(r, []) for r in self._capped]
        self._capped = []
        for chunk in out.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None:  # aborted while the step ran
                continue
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
