"""A model stage bound to its KV cache: hidden states in, hidden states (or logits) out.

The same object runs a stage in the in-process chain (``model_runner.py``) and in a pipeline
group's processes (``pipeline/``), so both compute with one implementation. It does not
build inputs (``step_inputs.py``), move tensors between processes (``pipeline/stage_link.py``)
or sample (``request_sampler.py``).
"""

from __future__ import annotations

import time

import torch

from kunserve.worker.kv_cache import KVCache
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.step_inputs import StepInputs


class StageExecutor:
    def __init__(self, stage: LlamaStage, kv_cache: KVCache) -> None:
        self.stage = stage
        self.kv_cache = kv_cache
        self.busy_seconds = 0.0  # wall time spent computing: the pipeline's bubble meter

    @property
    def block_size(self) -> int:
        return self.kv_cache.geometry.block_size

    @property
    def is_first(self) -> bool:
        return self.stage.layer_range.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.layer_range.is_last

    def forward(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """``x``: token ids (N,) on the first stage, else the previous stage's (N, H).
        Writes this stage's layers' keys and values into the cache; returns (N, H)."""
        start = time.perf_counter()
        if inputs.max_block >= 0:
            self.kv_cache.commit_through(inputs.max_block)
        hidden = self.stage(x, inputs.positions, self.kv_cache.layer_caches(), inputs.meta)
        self.busy_seconds += time.perf_counter() - start
        return hidden  # (N, H)

    def logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Last stage only: (S, V) float32 logits of the rows that sample, in
        ``inputs.sampling_chunks`` order."""
        start = time.perf_counter()
        logits = self.stage.compute_logits(hidden[inputs.sample_rows])  # (S, V)
        self.busy_seconds += time.perf_counter() - start
        return logits
