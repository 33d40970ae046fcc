"""Attention over a paged KV cache.

One step's tokens arrive flattened as ``(N, heads, head_dim)``: first the single-token decodes
of ``num_decodes`` requests, then one span per prefill chunk. New keys and values are written
into their cache slots first; decodes then attend over their gathered blocks in one batched
call (the fused kernel of ``paged_decode.py`` reads K/V straight from the blocks), prefill
chunks one by one (their count per step is small, bounded by the token budget).
The per-step metadata is built once by the model runner and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kunserve.worker.model.paged_decode import paged_decode_attention


@dataclass
class PrefillSpan:
    """A chunk of one request's prompt (or recomputed tokens) in this step."""

    token_start: int  # index of the chunk's first token in the flattened step
    num_tokens: int
    context_start: int  # tokens of this request already in the cache before the chunk
    block_table: torch.Tensor  # (nb,) blocks covering context_start + num_tokens
    mask: torch.Tensor | None  # (n, T) bool, None when context_start == 0 (plain causal)


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # (N,) cache block of each new token
    slot_offsets: torch.Tensor  # (N,) offset inside that block
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # (D, nb_max)
    decode_context_lens: torch.Tensor | None  # (D,) keys 0..len-1 are visible
    prefills: list[PrefillSpan]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """Store ``k``/``v`` in the cache and return attention outputs (N, heads, hd).

    ``q``: (N, heads, hd); ``k``, ``v``: (N, kv_heads, hd);
    ``k_cache``, ``v_cache``: (num_blocks, block_size, kv_heads, hd) views of one layer.
    """
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v
    if not meta.prefills:
        return _decode_attention(q, k_cache, v_cache, meta)
    out = torch.empty_like(q)  # (N, heads, hd)
    if meta.num_decodes:
        out[:meta.num_decodes] = _decode_attention(q[:meta.num_decodes], k_cache, v_cache, meta)
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, span)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
    return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                  meta.decode_context_lens, q.shape[-1] ** -0.5)  # (D, h, hd)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor,
                       span: PrefillSpan) -> torch.Tensor:
    if span.mask is None:  # nothing cached before this chunk: attend to the chunk itself
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            is_causal=True, enable_gqa=True)  # (h, n, hd)
        return out.transpose(0, 1)
    total = span.context_start + span.num_tokens
    kv_heads, hd = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache[span.block_table].view(-1, kv_heads, hd)[:total].transpose(0, 1)  # (kvh, T, hd)
    values = v_cache[span.block_table].view(-1, kv_heads, hd)[:total].transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys, values, attn_mask=span.mask, enable_gqa=True)  # (h, n, hd)
    return out.transpose(0, 1)
