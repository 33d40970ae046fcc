"""The leader's side of a pipeline group as the engine's step runner: stage 0 plus the link.

``submit`` builds the step's inputs, runs stage 0 (the embedding and the first layers) and
sends the chunks and hidden states to rank 1 without waiting, so the leader can schedule and
run the next micro-batch while this one is in later stages; ``collect`` waits for the oldest
micro-batch's sampled tokens from the last rank. Micro-batches leave and come back in order.
The runner does not schedule (the engine and scheduler do) and does not sample (the last rank
does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch

from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError
from kunserve.worker.pipeline.stage_messages import (
    LeaderMessage,
    PipelineStopped,
    SampledTokens,
    StageBatch,
    StopPipeline,
)
from kunserve.worker.scheduler_output import ScheduledChunk, SchedulerOutput
from kunserve.worker.stage_executor import StageExecutor
from kunserve.worker.step_inputs import prepare_inputs

T = TypeVar("T")


@dataclass
class StageAhead:
    """The first stage of one decode step of the leader's own requests, computed at a drop
    while the leader waited for its members (``reconfigure``): the hidden states of each
    request's newest token, and the token and position each row is for. A micro-batch of
    exactly those decodes takes its rows instead of running the first stage again; its KV
    was written into the cache when the rows were computed."""

    hidden: torch.Tensor  # (N, H)
    rows: dict[str, tuple[int, int, int]]  # request id -> (position, token id, row)
    seconds: float = 0.0

    def take(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """The rows of ``chunks`` (in their order) when each is one of these decodes, else
        None. Rows taken are forgotten."""
        found = [self.rows.get(c.request_id) for c in chunks]
        if not chunks or any(row is None or row[:2] != (c.start_position, c.token_ids[0])
                             or c.num_tokens != 1 for row, c in zip(found, chunks, strict=True)):
            return None
        for chunk in chunks:
            del self.rows[chunk.request_id]
        return self.hidden[[row[2] for row in found]]


@dataclass
class _InFlight:
    seq: int
    sampling_ids: list[str]  # request ids of the rows the last rank samples, in order


class LeaderRunner:
    def __init__(self, executor: StageExecutor, link: StageLink, depth: int,
                 ahead: StageAhead | None = None,
                 served: Callable[[], None] | None = None) -> None:
        """``ahead``: first-stage rows computed before the group formed, for the first
        micro-batches that are made of them (none once one is not); ``served``: called as
        each micro-batch's tokens come back (a drop's ``ParamsRelease``)."""
        if not link.is_leader or not executor.is_first or link.size < 2:
            raise ValueError("the leader runner is rank 0 of a group of 2 or more stages")
        self.executor = executor
        self.link = link
        self.depth = depth
        self.ahead = ahead
        self.rows_ahead_used = 0
        self._served = served
        self.broken: StageLinkError | None = None
        self._in_flight: deque[_InFlight] = deque()
        self._finished: list[str] = []  # to tell the last rank with the next batch
        self._next_seq = 0

    # -- the engine's step-runner interface --------------------------------------------------
    @torch.inference_mode()
    def submit(self, out: SchedulerOutput) -> None:
        self._check()
        inputs = prepare_inputs(out.chunks, self.executor.block_size)
        hidden = self._rows_ahead(inputs.chunks)  # rows follow the inputs' chunk order
        if hidden is None:
            hidden = self.executor.forward(inputs.input_ids, inputs)  # (N, H)
        batch = StageBatch(seq=self._next_seq, chunks=out.chunks,
                           finished=self._finished + out.finished)
        # its sampled tokens will come back: their receive is posted before the batch leaves
        self._guard(lambda: (self.link.post_ahead(self.link.last_rank),
                             self.link.send_message(batch, 1, hidden)),
                    f"sending micro-batch {batch.seq} to stage 1")
        self._finished = []
        self._in_flight.append(_InFlight(batch.seq, [c.request_id
                                                     for c in inputs.sampling_chunks]))
        self._next_seq += 1

    def _rows_ahead(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """The rows ahead for a micro-batch of the first round (one per stage) made of them
        alone; after that round, or once all are used, they are let go."""
        if self.ahead is None:
            return None
        rows = self.ahead.take(chunks)
        if rows is not None:
            self.rows_ahead_used += len(rows)
        if not self.ahead.rows or self._next_seq + 1 >= self.depth:
            self.ahead = None
        return rows

    def collect(self) -> dict[str, int]:
        self._check()
        expected = self._in_flight.popleft()
        reply = self._guard(lambda: self.link.recv_message(LeaderMessage, self.link.last_rank),
                            f"waiting for micro-batch {expected.seq}'s tokens from the last "
                            f"stage (rank {self.link.last_rank})")
        if not isinstance(reply, SampledTokens) or reply.seq != expected.seq or len(
                reply.token_ids) != len(expected.sampling_ids):
            self._fail(f"expected {len(expected.sampling_ids)} tokens of micro-batch "
                       f"{expected.seq} from the last stage, got {reply!r}")
        if self._served is not None:
            self._served()
        return dict(zip(expected.sampling_ids, reply.token_ids, strict=True))

    def release(self, request_ids: list[str]) -> None:
        self._finished.extend(request_ids)

    # -- the end of the epoch ----------------------------------------------------------------
    def stop(self) -> list[float]:
        """End the epoch: every rank leaves its loop. Returns each rank's busy seconds.
        Collect every micro-batch in flight first."""
        self._check()
        if self._in_flight:
            raise ValueError(f"{len(self._in_flight)} micro-batches are still in flight")

        def stop_all() -> LeaderMessage:
            self.link.send_message(StopPipeline(busy_seconds=[self.executor.busy_seconds]), 1)
            reply = self.link.recv_message(LeaderMessage, self.link.last_rank)
            self.link.flush()
            return reply

        reply = self._guard(stop_all, "stopping the stages")
        if not isinstance(reply, PipelineStopped):
            self._fail(f"expected the last stage to confirm the stop, got {reply!r}")
        return reply.busy_seconds

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    # -- failure -----------------------------------------------------------------------------
    def _guard(self, action: Callable[[], T], doing: str) -> T:
        """Run a link operation; a failure breaks the runner for good."""
        try:
            return action()
        except StageLinkError as exc:
            message = str(exc)
        self._fail(f"failed while {doing}: {message}")

    def _check(self) -> None:
        if self.broken is not None:
            raise StageLinkError(f"broken: {self.broken}")

    def _fail(self, message: str) -> NoReturn:
        self.broken = StageLinkError(f"the pipeline group of epoch {self.link.epoch} "
                                     f"{message}")
        raise self.broken
