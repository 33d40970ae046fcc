"""Runs one step of the whole model in this process: inputs -> chained stages -> sampling.

The runner decides nothing about which tokens run (the scheduler did) and shares every piece
with the cross-process pipeline: ``prepare_inputs`` builds the step's tensors, a
``StageExecutor`` per stage runs the layers against that stage's KV cache, and a
``RequestSampler`` owns the seeded generators. Its job ends at the sampled token ids.
"""

from __future__ import annotations

from collections import deque

import torch

from kunserve.worker.kv_cache import KVCache
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.request_sampler import RequestSampler
from kunserve.worker.scheduler_output import ScheduledChunk, SchedulerOutput
from kunserve.worker.stage_executor import StageExecutor
from kunserve.worker.step_inputs import StepInputs, prepare_inputs
from kunserve.worker.swap_space import SwapSpace


class ModelRunner:
    """Runs one or more chained stages in this process, each with its own KV cache.

    A worker holding the whole model has one stage. Several chained stages (each a layer
    range, all sharing one block table per request) prove that a split model computes exactly
    what the whole model does; across processes ``pipeline/`` does the same over the network.

    As the engine's step runner it has ``depth`` 1: ``submit`` computes the step at once and
    ``collect`` hands its tokens back.
    """

    depth = 1

    def __init__(self, stages: list[LlamaStage], kv_caches: list[KVCache],
                 swap_blocks: int = 0) -> None:
        """``swap_blocks``: host blocks for swap preemption (``swap_space.py``), per cache."""
        if not stages[0].layer_range.is_first or not stages[-1].layer_range.is_last:
            raise ValueError("the chained stages must cover the model from first to last layer")
        self.executors = [StageExecutor(s, c) for s, c in zip(stages, kv_caches, strict=True)]
        self.block_size = kv_caches[0].geometry.block_size
        self.sampler = RequestSampler(kv_caches[0].storage.device)
        self.swap_spaces = [SwapSpace(c, swap_blocks) for c in kv_caches] if swap_blocks else []
        self._done: deque[dict[str, int]] = deque()

    @property
    def swap_blocks(self) -> int:
        return self.swap_spaces[0].num_blocks if self.swap_spaces else 0

    # -- the engine's step-runner interface --------------------------------------------------
    def submit(self, out: SchedulerOutput) -> None:
        self._done.append(self.execute(out))

    def collect(self) -> dict[str, int]:
        return self._done.popleft()

    def release(self, request_ids: list[str]) -> None:
        """Requests that left the engine: drop their generators."""
        self.sampler.forget(request_ids)

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of every request whose chunk ended."""
        self.release(out.finished)
        if out.swap_out or out.swap_in:
            for space in self.swap_spaces:
                space.apply(out.swap_out, out.swap_in)
        if not out.chunks:
            return {}
        logits, chunks = self.forward(out)
        return self.sample(logits, chunks) if chunks else {}

    def forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run every stage; logits (S, V) of the chunks that sample, in that order."""
        inputs = self.prepare_inputs(out.chunks)
        x = inputs.input_ids  # (N,) then (N, H)
        for executor in self.executors:
            x = executor.forward(x, inputs)
        if not inputs.sampling_chunks:
            return x[:0], []
        return self.executors[-1].logits(x, inputs), inputs.sampling_chunks  # (S, V)

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> dict[str, int]:
        tokens = self.sampler.sample(logits, chunks)
        return {c.request_id: t for c, t in zip(chunks, tokens, strict=True)}

    def prepare_inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        return prepare_inputs(chunks, self.block_size)
