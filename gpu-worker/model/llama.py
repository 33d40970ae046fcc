"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a pipeline stage.

A stage holds a contiguous layer range. The first stage embeds token ids, the last applies the
final norm and LM head; any stage maps hidden states (N, H) to hidden states (N, H). The model
knows nothing about scheduling: it gets flattened tokens, positions and attention metadata.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kunserve.worker.layer_range import LayerRange
from kunserve.worker.model.attention import AttentionMetadata, paged_attention
from kunserve.worker.model.rope import RotaryEmbedding, apply_rotary
from kunserve.worker.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (N, H)
        return self.weight * x32.to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, dtype)
        self.qkv_proj = nn.Linear(h, config.q_size + 2 * config.kv_size, bias=config.qkv_bias,
                                  dtype=dtype)
        self.o_proj = nn.Linear(config.q_size, h, bias=False, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype)
        self.gate_up_proj = nn.Linear(h, 2 * config.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = x + self._attention(self.input_layernorm(x), rope, kv, meta)
        return x + self._mlp(self.post_attention_layernorm(x))

    def _attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        c = self.config
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = apply_rotary(q.view(n, c.num_heads, c.head_dim), *rope)  # (N, h, hd)
        k = apply_rotary(k.view(n, c.num_kv_heads, c.head_dim), *rope)  # (N, kvh, hd)
        v = v.view(n, c.num_kv_heads, c.head_dim)  # (N, kvh, hd)
        out = paged_attention(q, k, v, kv[0], kv[1], meta)  # (N, h, hd)
        return self.o_proj(out.reshape(n, c.q_size))  # (N, H)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, I) each
        return self.down_proj(F.silu(gate).mul_(up))  # (N, H)


class LlamaStage(nn.Module):
    """Layers ``[start, end)`` of a Llama-family model, its tensors of ``dtype``. Built on the
    meta device, then given its tensors (``checkpoint.build_stage``)."""

    def __init__(self, config: ModelConfig, layers: LayerRange, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.layer_range = layers
        # given a weight, the embedding skips its random init: on the meta device (where
        # stages are built before their tensors are assigned) that init first imports
        # torch's compiler stack, 1.5 s of every worker's start
        self.embed_tokens = (nn.Embedding(config.vocab_size, config.hidden_size,
                                          _weight=torch.empty(config.vocab_size,
                                                              config.hidden_size, dtype=dtype))
                             if layers.is_first else None)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(layers.size))
        if layers.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                     dtype=dtype)
        # its tables are computed once the stage has tensors (``checkpoint.build_stage``): a
        # stage on the meta device only tells shapes and never runs
        self.rotary: RotaryEmbedding | None = None

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """``inputs``: token ids (N,) on the first stage, else hidden states (N, H).
        ``kv_caches[i]``: (k, v) cache views of this stage's i-th layer. Returns (N, H),
        normed when this is the last stage."""
        x = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # (N, H)
        assert self.rotary is not None, "a stage runs once build_stage gave it its tensors"
        rope = self.rotary.lookup(positions)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, kv, meta)
        return self.norm(x) if self.layer_range.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, H) final hidden states -> (S, V) float32 logits."""
        return self.lm_head(hidden).float()

    def narrow(self, layers: LayerRange) -> LlamaStage:
        """A stage of ``layers`` (inside this one's) that shares this one's tensors: once
        this stage is dropped, the tensors of the other layers are freed."""
        mine = self.layer_range
        if not (mine.start <= layers.start and layers.end <= mine.end):
            raise ValueError(f"layers [{layers.start}, {layers.end}) are not all held by "
                             f"[{mine.start}, {mine.end})")
        # assembled from this stage's modules, not constructed: building the modules of a
        # stage, even on the meta device, costs milliseconds in the middle of a drop
        narrow = LlamaStage.__new__(LlamaStage)
        nn.Module.__init__(narrow)
        narrow.config, narrow.layer_range = self.config, layers
        narrow.embed_tokens = self.embed_tokens if layers.is_first else None
        narrow.layers = nn.ModuleList(self.layers[layers.start - mine.start:
                                                  layers.end - mine.start])
        if layers.is_last:
            narrow.norm, narrow.lm_head = self.norm, self.lm_head
        narrow.rotary = self.rotary
        return narrow.eval().requires_grad_(False)

    def model_state(self) -> dict[str, torch.Tensor]:
        """This stage's tensors under whole-model names (``layers.<model layer>...``), so
        the stages of one model merge into one state dict."""
        offset = self.layer_range.start
        state = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("layers."):
                index, rest = name[len("layers."):].split(".", 1)
                name = f"layers.{int(index) + offset}.{rest}"
            state[name] = tensor
        return state

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
