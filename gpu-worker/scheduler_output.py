"""What the scheduler hands the model runner each step: plain data, no shared state."""

from __future__ import annotations

from dataclasses import dataclass, field

from kunserve.worker.sampling_params import SamplingParams


@dataclass
class ScheduledChunk:
    """Tokens ``[start_position, start_position + len(token_ids))`` of one request."""

    request_id: str
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    samples: bool  # the chunk reaches the request's last token: sample the next one
    sampling_params: SamplingParams
    output_token_ids: list[int]  # generated so far; filled only when penalties need it
    num_output_tokens: int = 0  # generated so far (a seeded stream's draws before this one)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # requests that left the engine since the last step: the runner drops their state
    finished: list[str] = field(default_factory=list)
    # swap preemption, applied before the step's forward, outs first: (device block, host
    # block) copied out, (host block, device block) copied in
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not (self.chunks or self.swap_out or self.swap_in)
