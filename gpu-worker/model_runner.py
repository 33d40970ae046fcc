"""Turns a ``SchedulerOutput`` into tensors, runs the stage and samples.

The runner owns the per-request state that lives next to the model (seeded generators) and
the attention metadata of a step. It decides nothing about which tokens run: the scheduler did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kunserve.worker.kv_cache import KVCache
from kunserve.worker.model.attention import AttentionMetadata, PrefillSpan
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.sampler import Sampler, make_generator
from kunserve.worker.scheduler_output import ScheduledChunk, SchedulerOutput


@dataclass
class StepInputs:
    """One step's flattened model inputs; decodes first, then prefill chunks."""

    chunks: list[ScheduledChunk]
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows of the hidden states whose next token is sampled
    sampling_chunks: list[ScheduledChunk]


class ModelRunner:
    """Runs one or more chained stages in this process, each with its own KV cache.

    A worker holding the whole model has one stage. Several chained stages (each a layer
    range, all sharing one block table per request) prove that a split model computes exactly
    what the whole model does; across processes the pipeline does the same over the network.
    """

    def __init__(self, stages: list[LlamaStage], kv_caches: list[KVCache]) -> None:
        if not stages[0].layer_range.is_first or not stages[-1].layer_range.is_last:
            raise ValueError("the chained stages must cover the model from first to last layer")
        self.stages = stages
        self.kv_caches = kv_caches
        self.block_size = kv_caches[0].geometry.block_size
        self.sampler = Sampler()
        self.dtype = kv_caches[0].storage.dtype
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of every request whose chunk ended."""
        for request_id in out.finished:
            self._generators.pop(request_id, None)
        if out.is_empty:
            return {}
        logits, chunks = self.forward(out)
        return self.sample(logits, chunks) if chunks else {}

    def forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run every stage; logits (S, V) of the chunks that sample, in that order."""
        inputs = self.prepare_inputs(out.chunks)
        x = inputs.input_ids  # (N,) then (N, H)
        for stage, cache in zip(self.stages, self.kv_caches, strict=True):
            x = stage(x, inputs.positions, cache.layer_caches(), inputs.meta)
        if not inputs.sampling_chunks:
            return x[:0], []
        logits = self.stages[-1].compute_logits(x[inputs.sample_rows])  # (S, V)
        return logits, inputs.sampling_chunks

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> dict[str, int]:
        tokens = self.sampler(
            logits,
            [c.sampling_params for c in chunks],
            [c.output_token_ids for c in chunks],
            [self._generator(c) for c in chunks],
        )
        return {c.request_id: t for c, t in zip(chunks, tokens, strict=True)}

    def _generator(self, chunk: ScheduledChunk) -> torch.Generator | None:
        if chunk.sampling_params.seed is None:
            return None
        generator = self._generators.get(chunk.request_id)
        if generator is None:
            generator = make_generator(chunk.sampling_params, self.kv_caches[0].storage.device)
            self._generators[chunk.request_id] = generator
        return generator

    # -- inputs ------------------------------------------------------------------------------
    def prepare_inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for chunk in ordered:
            span = range(chunk.start_position, chunk.start_position + chunk.num_tokens)
            token_ids.extend(chunk.token_ids)
            positions.extend(span)
            table = chunk.block_table
            slot_blocks.extend(table[p // bs] for p in span)
            if chunk.samples:
                sample_rows.append(len(token_ids) - 1)
        positions_t = torch.tensor(positions, dtype=torch.long)
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long),
            slot_offsets=positions_t % bs,
            num_decodes=len(decodes),
            decode_block_tables=None,
            decode_context_lens=None,
            prefills=self._prefill_spans(prefills, start_row=len(decodes)),
        )
        if decodes:
            meta.decode_block_tables, meta.decode_context_lens = self._decode_tables(decodes)
        return StepInputs(
            chunks=ordered,
            input_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=positions_t,
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long),
            sampling_chunks=[c for c in ordered if c.samples],
        )

    def _decode_tables(self, decodes: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        context = [c.start_position + 1 for c in decodes]
        width = -(-max(context) // self.block_size)
        # padding entries name block 0: never read past a context, but they must be real ids
        tables = torch.tensor([c.block_table[:width] + [0] * (width - len(c.block_table[:width]))
                               for c in decodes], dtype=torch.long)  # (D, nb)
        return tables, torch.tensor(context, dtype=torch.long)  # (D, nb), (D,)

    def _prefill_spans(self, prefills: list[ScheduledChunk], start_row: int) -> list[PrefillSpan]:
        spans = []
        row = start_row
        for chunk in prefills:
            start, n = chunk.start_position, chunk.num_tokens
            mask = None
            if start > 0:
                queries = torch.arange(start, start + n)  # (n,)
                mask = torch.arange(start + n)[None, :] <= queries[:, None]  # (n, T)
            num_blocks = -(-(start + n) // self.block_size)
            spans.append(PrefillSpan(
                token_start=row, num_tokens=n, context_start=start,
                block_table=torch.tensor(chunk.block_table[:num_blocks], dtype=torch.long),
                mask=mask))
            row += n
        return spans
