"""How an instance's memory budget splits into parameters, a reserve and KV-cache blocks.

    kv_bytes   = budget - parameter_bytes - reserve_bytes
    num_blocks = kv_bytes // block_bytes
    block_bytes = layers_held * 2 * block_size * kv_heads * head_dim * dtype_bytes

The reserve covers one step's activations at the largest batch the scheduler can form (see
``activation_reserve``). Pure arithmetic: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kunserve.sizes import format_size


class MemoryBudgetError(ValueError):
    """The budget cannot hold the parameters, the reserve and at least one KV block."""


@dataclass(frozen=True)
class KVGeometry:
    layers_held: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def block_bytes(self) -> int:
        return (self.layers_held * 2 * self.block_size * self.num_kv_heads * self.head_dim
                * self.dtype_bytes)

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.block_size


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    parameter_bytes: int
    reserve_bytes: int
    block_bytes: int
    num_blocks: int

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        return (f"budget {format_size(self.budget_bytes)} = parameters "
                f"{format_size(self.parameter_bytes)} + reserve {format_size(self.reserve_bytes)}"
                f" + KV {format_size(self.kv_bytes)} ({self.num_blocks} blocks of "
                f"{format_size(self.block_bytes)})")


def plan_memory(budget_bytes: int, parameter_bytes: int, reserve_bytes: int,
                geometry: KVGeometry) -> MemoryPlan:
    kv_bytes = budget_bytes - parameter_bytes - reserve_bytes
    num_blocks = kv_bytes // geometry.block_bytes if kv_bytes > 0 else 0
    if num_blocks < 1:
        raise MemoryBudgetError(
            f"memory budget {format_size(budget_bytes)} cannot hold parameters "
            f"({format_size(parameter_bytes)}), the activation reserve "
            f"({format_size(reserve_bytes)}) and one KV block "
            f"({format_size(geometry.block_bytes)}); raise --memory-per-instance")
    return MemoryPlan(budget_bytes, parameter_bytes, reserve_bytes, geometry.block_bytes,
                      num_blocks)


def activation_reserve(hidden_size: int, intermediate_size: int, qkv_size: int, vocab_size: int,
                       max_num_batched_tokens: int, max_num_seqs: int, dtype_bytes: int) -> int:
    """Peak bytes of one step's live activations: a layer's widest tensors for every batched
    token, plus float32 logits for every sequence that samples."""
    per_token = (3 * hidden_size + qkv_size + 3 * intermediate_size) * dtype_bytes
    return max_num_batched_tokens * per_token + max_num_seqs * vocab_size * 4


def default_cpu_budget(parameter_bytes: int, kv_to_parameters: float | None = None) -> int:
    """The budget without a configured one, reserve aside: the parameters plus
    ``kv_to_parameters`` times as much again for the KV cache (Qwen-2.5-14B on an 80 GB GPU:
    ~1.6; a 70B model on two 80 GB GPUs: ~0.1); None: parameters take 40% of it (KV 1.5x)."""
    if kv_to_parameters is None:
        return int(parameter_bytes / 0.4)
    if kv_to_parameters <= 0:
        raise MemoryBudgetError(f"kv_to_parameters must be positive, got {kv_to_parameters}")
    return parameter_bytes + int(kv_to_parameters * parameter_bytes)
