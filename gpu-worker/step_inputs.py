"""One step's model inputs, built from the scheduler's chunks: the only place where chunks
become tensors.

Every process of a pipeline group builds the same ``StepInputs`` from the same chunk list
(the leader sends it to each stage as plain data), so row ``i`` of the hidden states means the
same token on every stage. The job ends at tensors and attention metadata: running the model
is ``stage_executor.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kunserve.worker.model.attention import AttentionMetadata, PrefillSpan
from kunserve.worker.scheduler_output import ScheduledChunk


@dataclass
class StepInputs:
    """One step's flattened model inputs; decodes first, then prefill chunks."""

    chunks: list[ScheduledChunk]
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows of the hidden states whose next token is sampled
    sampling_chunks: list[ScheduledChunk]
    max_block: int = -1  # the highest block the step writes into (-1: none)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def prepare_inputs(chunks: list[ScheduledChunk], block_size: int) -> StepInputs:
    """Flatten ``chunks`` (in the scheduler's order) into one step's inputs."""
    decodes = [c for c in chunks if c.num_tokens == 1]
    prefills = [c for c in chunks if c.num_tokens > 1]
    ordered = decodes + prefills
    token_ids: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    sample_rows: list[int] = []
    for chunk in ordered:
        span = range(chunk.start_position, chunk.start_position + chunk.num_tokens)
        token_ids.extend(chunk.token_ids)
        positions.extend(span)
        table = chunk.block_table
        slot_blocks.extend(table[p // block_size] for p in span)
        if chunk.samples:
            sample_rows.append(len(token_ids) - 1)
    positions_t = torch.tensor(positions, dtype=torch.long)  # (N,)
    meta = AttentionMetadata(
        slot_blocks=torch.tensor(slot_blocks, dtype=torch.long),  # (N,)
        slot_offsets=positions_t % block_size,  # (N,)
        num_decodes=len(decodes),
        decode_block_tables=None,
        decode_context_lens=None,
        prefills=_prefill_spans(prefills, len(decodes), block_size),
    )
    if decodes:
        meta.decode_block_tables, meta.decode_context_lens = _decode_tables(decodes, block_size)
    return StepInputs(
        chunks=ordered,
        input_ids=torch.tensor(token_ids, dtype=torch.long),  # (N,)
        positions=positions_t,
        meta=meta,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long),  # (S,)
        sampling_chunks=[c for c in ordered if c.samples],
        max_block=max(slot_blocks, default=-1),
    )


def _decode_tables(decodes: list[ScheduledChunk],
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    context = [c.start_position + 1 for c in decodes]
    width = -(-max(context) // block_size)
    # padding entries name block 0: never read past a context, but they must be real ids
    tables = torch.tensor([c.block_table[:width] + [0] * (width - len(c.block_table[:width]))
                           for c in decodes], dtype=torch.long)  # (D, nb)
    return tables, torch.tensor(context, dtype=torch.long)  # (D, nb), (D,)


def _prefill_spans(prefills: list[ScheduledChunk], start_row: int,
                   block_size: int) -> list[PrefillSpan]:
    spans = []
    row = start_row
    for chunk in prefills:
        start, n = chunk.start_position, chunk.num_tokens
        mask = None
        if start > 0:
            queries = torch.arange(start, start + n)  # (n,)
            mask = torch.arange(start + n)[None, :] <= queries[:, None]  # (n, T)
        num_blocks = -(-(start + n) // block_size)
        spans.append(PrefillSpan(
            token_start=row, num_tokens=n, context_start=start,
            block_table=torch.tensor(chunk.block_table[:num_blocks], dtype=torch.long),
            mask=mask))
        row += n
    return spans
